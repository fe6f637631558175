"""The answers to the exercises of notes/long-context.md, computed from architectures/common/rope.py."""

import math

from architectures.common.rope import default_inverse_frequencies, yarn_get_mscale


def test_wavelengths_of_the_slowest_and_fastest_pairs(hints):
    inv_freq = default_inverse_frequencies(64, 10_000.0)
    assert round(2 * math.pi / inv_freq[-1].item()) == 47_117
    assert math.isclose(2 * math.pi / inv_freq[0].item(), 2 * math.pi)
    assert "2π x 10,000^(62/64) = 47,117 positions" in hints("long-context")


def test_yarn_mscale_for_factor_40(hints):
    m = yarn_get_mscale(40, 1.0)
    assert math.isclose(m, 0.1 * math.log(40) + 1)
    assert (round(m, 4), round(m * m, 3)) == (1.3689, 1.874)
    assert "1.3689, squared 1.874" in hints("long-context")
