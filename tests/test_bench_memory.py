"""The memory estimate's measurement: the profiler-timeline peak of one training step."""

import pytest

from codetr.bench.memory import step_peak_bytes

pytestmark = pytest.mark.slow


def test_step_peak_counts_parameters_gradients_and_scales_with_pixels_and_checkpointing():
    small = step_peak_bytes("tiny", 128, ("model.encoder_checkpoint_layers=0",))
    large = step_peak_bytes("tiny", 256, ("model.encoder_checkpoint_layers=0",))
    checkpointed = step_peak_bytes("tiny", 256, ("model.encoder_checkpoint_layers=2",))
    # At least the fp32 parameters and their gradients are alive at the end of backward.
    assert small["peak_bytes"] > 8 * small["trainable_params"]
    # 4x the pixels: more activations; recomputing the encoder in backward keeps fewer of them.
    assert large["peak_bytes"] > small["peak_bytes"]
    assert checkpointed["peak_bytes"] < large["peak_bytes"]
