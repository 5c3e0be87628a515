"""The Triton deformable-attention kernels equal the exact PyTorch path, run in Triton's CPU interpreter (no GPU
here; the same kernels compile for CUDA).

Triton decides interpreter or compiler once per process, so the checks below run in a child pytest started with
``TRITON_INTERPRET=1`` by :func:`test_triton_kernels_in_the_interpreter`.
"""

import os
import subprocess
import sys

import pytest
import torch

from codetr.models.transformer.ms_deform_attn import (
    LevelLayout,
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)

pytest.importorskip("triton")
SHAPES = [(7, 9), (4, 5), (2, 3)]
IN_INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not IN_INTERPRETER, reason="runs in the TRITON_INTERPRET=1 child process")


@pytest.mark.skipif(IN_INTERPRETER, reason="this is the parent")
def test_triton_kernels_in_the_interpreter():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "6 passed" in result.stdout, result.stdout[-2000:]


@pytest.fixture
def interpreted():
    import codetr.models.transformer.ms_deform_attn_triton as module

    return module


def random_inputs(dims, dtype=torch.float32, batch=2, queries=9, heads=3, points=2):
    torch.manual_seed(0)
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, dims).to(dtype).requires_grad_()
    # Some locations fall outside [0, 1]: corners outside the maps count as zeros.
    locations = (torch.rand(batch, queries, heads, len(SHAPES), points, 2) * 1.2 - 0.1).to(dtype).requires_grad_()
    weights = torch.rand(batch, queries, heads, len(SHAPES), points).softmax(-1).to(dtype).requires_grad_()
    return value, locations, weights


def assert_relatively_close(actual, expected, tolerance):
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((actual.float() - expected.float()).abs().max() / scale).item() < tolerance


@needs_interpreter
@pytest.mark.parametrize("dims", [4, 24, 32])  # 24: channel block wider than the head (masked lanes)
def test_triton_kernels_match_exact_path_values_and_gradients(interpreted, dims):
    value, locations, weights = random_inputs(dims)
    exact = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    fast = interpreted.multi_scale_deformable_attention_triton(value, SHAPES, locations, weights)
    assert fast.shape == exact.shape
    torch.testing.assert_close(fast, exact, atol=1e-5, rtol=1e-5)
    g_exact = torch.autograd.grad(exact.square().sum(), (value, locations, weights))
    g_fast = torch.autograd.grad(fast.square().sum(), (value, locations, weights))
    for a, b in zip(g_fast, g_exact):
        assert_relatively_close(a, b, 1e-5)


@needs_interpreter
def test_triton_bf16_inputs_accumulate_in_fp32(interpreted):
    value, locations, weights = random_inputs(32, torch.bfloat16)
    fast = interpreted.multi_scale_deformable_attention_triton(value, SHAPES, locations, weights)
    exact = multi_scale_deformable_attention(value.float(), SHAPES, locations.float(), weights.float())
    assert fast.dtype == torch.bfloat16
    assert_relatively_close(fast, exact, 1e-2)  # bf16 output rounding only


@needs_interpreter
def test_module_triton_impl_equals_pytorch_impl(interpreted):
    torch.manual_seed(0)
    fast = MultiScaleDeformableAttention(32, 4, len(SHAPES), 3, impl="triton")
    exact = MultiScaleDeformableAttention(32, 4, len(SHAPES), 3, impl="pytorch")
    with torch.no_grad():
        fast.sampling_offsets.weight.normal_(0, 0.1)
        fast.attention_weights.weight.normal_(0, 0.1)
    exact.load_state_dict(fast.state_dict())
    layout = LevelLayout.from_shapes(SHAPES, torch.device("cpu"))
    query, value = torch.randn(2, 5, 32), torch.randn(2, layout.num_tokens, 32)
    ref = torch.rand(2, 5, len(SHAPES), 2)
    torch.testing.assert_close(fast(query, ref, value, layout), exact(query, ref, value, layout), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_triton_impl_on_cpu_without_interpreter_says_what_to_use(interpreted, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    value, locations, weights = random_inputs(4)
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        interpreted.multi_scale_deformable_attention_triton(value, SHAPES, locations, weights)


@pytest.mark.skipif(IN_INTERPRETER, reason="compiles, does not interpret")
def test_triton_kernels_compile_for_a_hopper_gpu_without_one():
    """Both kernels lower to an sm_90 cubin with Triton's bundled ptxas (catches what the interpreter cannot:
    constructs the GPU compiler rejects)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from codetr.models.transformer import ms_deform_attn_triton as kernels

    sizes = {"N": "i32", "H": "i32", "Q": "i32", "L": "constexpr", "P": "constexpr", "D": "constexpr",
             "BLOCK_Q": "constexpr", "BLOCK_D": "constexpr"}
    constants = {"L": 5, "P": 4, "D": 32, "BLOCK_Q": kernels.BLOCK_QUERIES, "BLOCK_D": 32}
    pointers = {
        kernels._forward_kernel: {"value": "*bf16", "shapes": "*i32", "starts": "*i32", "loc": "*fp32",
                                  "attn": "*fp32", "out": "*bf16"},
        kernels._backward_kernel: {"grad_out": "*bf16", "value": "*bf16", "shapes": "*i32", "starts": "*i32",
                                   "loc": "*fp32", "attn": "*fp32", "grad_value": "*fp32", "grad_loc": "*fp32",
                                   "grad_attn": "*fp32"},
    }
    for kernel, signature in pointers.items():
        compiled = triton.compile(ASTSource(fn=kernel, signature={**signature, **sizes}, constexprs=constants),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"]
