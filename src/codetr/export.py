"""Export entry point: ``python -m codetr.export CKPT OUT [--format onnx|torch-export|aoti]``.

Writes the inference model of a codetr checkpoint (main head only, NMS-free top-k decoding, dynamic batch and
image size; see :mod:`codetr.inference.export`) and, with ``--check``, runs the file once against the eager model
on random images of two sizes and prints the largest differences.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import torch

from codetr.inference.export import FORMATS, example_inputs, inference_model, load_exported


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m codetr.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="codetr checkpoint (.ckpt from training or python -m codetr.convert)")
    parser.add_argument("out", help="output file (.onnx, or .pt2 for torch-export / aoti)")
    parser.add_argument("--format", choices=FORMATS, default=None, help="default: from the suffix (.onnx / .pt2)")
    parser.add_argument("--recipe", default=None, help="experiment describing a checkpoint that carries no description")
    parser.add_argument("--override", action="append", default=[], help="config override for --recipe (repeatable)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 16 for grid_sample)")
    parser.add_argument("--check", action="store_true", help="compare the exported file with the eager model")
    args = parser.parse_args(argv)
    from codetr.inference.detector import Detector

    export_format = args.format or ("onnx" if args.out.endswith(".onnx") else "torch-export")
    try:
        detector = Detector.from_checkpoint(args.checkpoint, recipe=args.recipe, overrides=args.override)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    start = time.perf_counter()
    path = detector.export(args.out, export_format, opset=args.opset)
    print(f"wrote {path} ({export_format}, {path.stat().st_size / 2**20:.1f} MiB) "
          f"in {time.perf_counter() - start:.0f} s")
    if args.check:
        eager, exported = inference_model(detector), load_exported(path, export_format)
        for batch, height, width in ((1, 160, 192), (2, 224, 160)):
            inputs = example_inputs(batch, height, width)
            with torch.inference_mode():
                expected = eager(*inputs)
            got = exported(*inputs)
            print(f"batch {batch} {height}x{width}: max |boxes| diff {(got[0] - expected[0]).abs().max():.2e} px, "
                  f"max |scores| diff {(got[1] - expected[1]).abs().max():.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
