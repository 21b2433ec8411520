"""Property: on random DAG CNNs (residual adds, concat, chunk, depthwise/grouped conv, channel
shuffle, SE, GroupNorm, channels-last LayerNorm+MLP, flatten→linear) with random dead channels,
shrink succeeds and the result equals the masked model. benchmarks/fuzz.py runs 10,000 cases."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import strfx
from strfx.errors import NothingToSparsifyError
from strfx.surgery import random_like
from strfx.testing import kill_channels, random_cnn


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), fraction=st.floats(0.1, 0.9))
def test_random_cnn_shrinks_exactly(seed, fraction):
    model, x = random_cnn(seed)
    try:
        gm = strfx.sparsify(model, "structured", example_inputs=x)
    except NothingToSparsifyError:
        assume(False)  # every channel of this net is blocked: nothing to shrink
    kill_channels(gm, fraction, seed=seed)
    small = strfx.shrink(gm)  # raises on any mismatch: the property is that it never does
    rep = small.strfx_shrink
    assert rep["params_after"] <= rep["params_before"]
    with torch.no_grad():
        gm.eval(), small.eval()
        y = random_like(x, seed + 1)
        expected = gm(*y)
        torch.testing.assert_close(small(*y), expected, rtol=1e-4, atol=1e-4 * max(expected.abs().max().item(), 1e-6))
