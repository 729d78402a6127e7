"""MCt's positional table for texts shorter than the context: Apple's resampling, not a slice."""

import math

import pytest
import torch

from siclip.models import create_model
from siclip.models.text import resample_positions


def reference_resample(table: torch.Tensor, length: int) -> torch.Tensor:
    """Float64 loop: row t = (1 − w)·P[⌊s⌋] + w·P[min(⌊s⌋+1, C−1)], s = max(0, (t + ½)·C/T − ½)."""
    table = table.double()
    context = table.shape[0]
    rows = []
    for t in range(length):
        s = max(0.0, (t + 0.5) * context / length - 0.5)
        lo = math.floor(s)
        hi, w = min(lo + 1, context - 1), s - lo
        rows.append((1 - w) * table[lo] + w * table[hi])
    return torch.stack(rows)


@pytest.mark.parametrize("context,length", [(77, 77), (77, 20), (77, 5), (32, 31), (32, 1), (16, 40)])
def test_resample_matches_float64_reference(seed, context, length):
    table = torch.randn(context, 24)
    got = resample_positions(table, length)
    assert got.shape == (length, 24)
    # float32 source coordinates: errors of a few 1e-5 against the float64 positions
    torch.testing.assert_close(got.double(), reference_resample(table, length), atol=1e-4, rtol=1e-4)
    if length == context:
        assert got is table  # the full context is the table itself, as in Apple's encoder


def test_apple_bilinear_form_is_the_same_function(seed):
    """Apple resizes the (1, 1, C, D) table to (T, D) with bilinear interpolation: the width axis maps onto itself."""
    table = torch.randn(77, 16)
    apple = torch.nn.functional.interpolate(table[None, None], size=(13, 16), mode="bilinear")[0, 0]
    torch.testing.assert_close(resample_positions(table, 13), apple)


def test_short_text_uses_the_resampled_table(seed):
    model = create_model("mobileclip_tiny").eval()
    ids = torch.randint(1, 200, (3, 10))
    ids[:, -1] = 255
    text = model.text
    with torch.no_grad():
        sliced_before = text.token_embedding(ids) + text.positional_embedding[:10]
        expected = text.token_embedding(ids) + reference_resample(text.positional_embedding, 10).float()
        seen = {}
        handle = text.mixer_in.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
        text(ids)
        handle.remove()
    torch.testing.assert_close(seen["x"], expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(seen["x"], sliced_before)
