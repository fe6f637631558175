"""The scripts that draw the notes' explanatory figures: the measured scale of attention scores,
and the concept diagrams."""

import math

import pytest

from fundamentals.experiments import attention_scale, concept_figures


def test_attention_scores_spread_as_sqrt_d_and_the_scale_undoes_it():
    for d in (16, 256):
        row = attention_scale.measure(d, queries=300, keys=64)
        assert abs(row["unscaled_std"] / math.sqrt(d) - 1) < 0.05
        assert abs(row["scaled_std"] - 1) < 0.05
        assert row["scaled_saturated"] == 0
    wide, narrow = attention_scale.measure(256, 300, 64), attention_scale.measure(16, 300, 64)
    assert wide["unscaled_max_weight"] > narrow["unscaled_max_weight"] + 0.2  # wider heads, sharper softmax


@pytest.mark.slow
def test_every_concept_figure_is_drawn(tmp_path):
    written = concept_figures.main(["--out", str(tmp_path)])
    assert sorted(p.name for p in written) == sorted(f"{name}.png" for name in concept_figures.FIGURES)
    assert all(p.stat().st_size > 10_000 for p in written)
