"""Intervals over seeds and paired tests (illume.metrics.stats) against hand-computed examples."""

import math

import pytest

from illume.metrics.stats import mean_interval, paired_comparison, t_quantile, t_two_sided_mass


@pytest.mark.parametrize("df, critical", [(1, 12.7062047), (2, 4.3026527), (3, 3.1824463), (4, 2.7764451),
                                          (5, 2.5705818), (10, 2.2281389), (30, 2.0422725)])
def test_t_quantile_matches_the_tables(df, critical):
    assert t_quantile(0.975, df) == pytest.approx(critical, abs=1e-6)


def test_t_mass_closed_forms():
    # df=1 is the Cauchy distribution: P(|T| <= 1) = 1/2; df=2: P(|T| <= t) = t / sqrt(2 + t^2).
    assert t_two_sided_mass(1.0, 1) == pytest.approx(0.5)
    for t in (0.3, 1.0, 2.5, 7.0):
        assert t_two_sided_mass(t, 2) == pytest.approx(t / math.sqrt(2 + t * t))
    # Large df approaches the normal: P(|Z| <= 1.959964) = 0.95.
    assert t_two_sided_mass(1.959964, 2000) == pytest.approx(0.95, abs=2e-4)


def test_mean_interval_by_hand():
    # Values 1, 2, 3: mean 2, sd 1, n 3 -> half-width 4.3026527 * 1 / sqrt(3) = 2.4841377.
    interval = mean_interval([1.0, 2.0, 3.0])
    assert interval.mean == pytest.approx(2.0)
    assert interval.half_width == pytest.approx(2.4841377, abs=1e-6)
    assert (interval.low, interval.high) == pytest.approx((2 - 2.4841377, 2 + 2.4841377), abs=1e-6)
    assert math.isnan(mean_interval([5.0]).half_width)


def test_paired_comparison_by_hand():
    # Differences 1, 2, 2: mean 5/3, sd sqrt(1/3), t = (5/3) / (sqrt(1/3) / sqrt(3)) = 5, df 2;
    # two-sided p = 1 - 5 / sqrt(27) = 0.0377496.
    result = paired_comparison([11.0, 12.0, 13.0], [10.0, 10.0, 11.0])
    assert result.t == pytest.approx(5.0)
    assert result.p_value == pytest.approx(1 - 5 / math.sqrt(27))
    assert result.difference.mean == pytest.approx(5 / 3)
    assert result.difference.half_width == pytest.approx(4.3026527 * math.sqrt(1 / 3) / math.sqrt(3), abs=1e-6)
    assert result.significant()
    # The same scores unpaired would not be significant; paired, the seed's shared part cancels. A noisier
    # pair of methods is not: differences 3, -1, 1 -> t = 1 / (2 / sqrt(3)), p = 0.4226.
    noisy = paired_comparison([13.0, 9.0, 12.0], [10.0, 10.0, 11.0])
    assert noisy.p_value == pytest.approx(1 - (math.sqrt(3) / 2) / math.sqrt(2 + 0.75))
    assert not noisy.significant()


def test_paired_comparison_edge_cases():
    assert paired_comparison([1.0, 2.0], [1.0, 2.0]).p_value == 1.0  # no difference at all
    assert paired_comparison([2.0, 3.0], [1.0, 2.0]).p_value == 0.0  # the same difference every seed
    with pytest.raises(ValueError, match="two seeds"):
        paired_comparison([1.0], [2.0])
    with pytest.raises(ValueError, match="differ in number"):
        paired_comparison([1.0, 2.0], [2.0])
