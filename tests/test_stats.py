"""Intervals and paired tests on constructed cases whose answers are known."""

import numpy as np
import pytest

from src import stats


def test_mcnemar_is_a_two_sided_exact_binomial_test_on_the_discordant_images():
    # A alone right on 2 images, B alone right on 10, both right on 50, both wrong on 8
    a = np.array([True] * 2 + [False] * 10 + [True] * 50 + [False] * 8)
    b = np.array([False] * 2 + [True] * 10 + [True] * 50 + [False] * 8)
    # 2 x P(X <= 2) for X ~ Binomial(12, 1/2) = 2 x (1 + 12 + 66) / 4096
    assert stats.mcnemar_exact(a, b) == pytest.approx(158 / 4096)
    assert stats.mcnemar_exact(b, a) == pytest.approx(158 / 4096)  # symmetric
    assert stats.mcnemar_exact(a, a) == 1.0  # no discordant image: no evidence either way


def test_the_paired_comparison_gives_the_difference_its_interval_and_mcnemar():
    a = np.array([True] * 2 + [False] * 10 + [True] * 50 + [False] * 8)
    b = np.array([False] * 2 + [True] * 10 + [True] * 50 + [False] * 8)
    paired = stats.paired_comparison(a, b)
    assert (paired.n, paired.accuracy_a, paired.accuracy_b) == (70, 52 / 70, 60 / 70)
    assert paired.difference == pytest.approx(8 / 70) and paired.p_value == pytest.approx(158 / 4096)
    # per-image differences: +1 on 10 images, -1 on 2, 0 elsewhere; their mean's standard error is about 0.048,
    # so the 95 % interval spans about 8/70 -+ 0.094
    assert paired.ci_low == pytest.approx(8 / 70 - 0.094, abs=0.02)
    assert paired.ci_high == pytest.approx(8 / 70 + 0.094, abs=0.02)
    assert stats.paired_comparison(a, b) == paired  # seeded: the same interval every time
    same = stats.paired_comparison(a, a)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0, 0, 0, 1)


def test_the_accuracy_interval_matches_the_binomial_one_on_a_large_sample():
    correct = np.arange(6000) < 5100  # 0.85 of 6,000
    low, high = stats.accuracy_interval(correct)
    half = 1.96 * np.sqrt(0.85 * 0.15 / 6000)  # the normal approximation: 0.0090
    assert low == pytest.approx(0.85 - half, abs=0.002) and high == pytest.approx(0.85 + half, abs=0.002)
    assert stats.accuracy_interval(np.ones(50, bool)) == (1.0, 1.0)


def test_mean_class_accuracy_weighs_every_class_alike():
    labels = np.array([0] * 8 + [1] * 2)
    correct = np.array([True] * 8 + [False] * 2)  # the large class right, the small one wrong
    assert stats.mean_class_accuracy(correct, labels) == 0.5 and correct.mean() == 0.8
    low, high = stats.mean_class_interval(correct, labels)
    assert low <= 0.5 <= high
    assert stats.mean_class_interval(np.ones(10, bool), labels) == (1.0, 1.0)


def test_pooled_seeds_use_each_images_mean_and_a_sign_flip_test():
    images = 200
    a = np.zeros((3, images), bool)
    a[:, :100] = True
    b = a.copy()
    b[:, 100:140] = True  # every seed of B right on 40 more images
    pooled = stats.pooled_comparison(a, b)
    assert pooled.difference == pytest.approx(0.2) and pooled.ci_low > 0.1
    assert pooled.p_value == pytest.approx(1 / (stats.PERMUTATIONS + 1))  # no sign flip reaches it
    mixed = a.copy()
    mixed[0, 100:110], mixed[1, :10] = True, False  # one seed better on 10 images, another worse on 10
    assert stats.pooled_comparison(a, mixed).p_value > 0.5


def test_the_t_interval_of_a_few_values():
    mean, low, high = stats.t_interval([1.0, 2.0, 3.0])
    half = 4.302653 * 1 / np.sqrt(3)  # t(0.975, 2 degrees of freedom) x sd / sqrt(n)
    assert (mean, low, high) == (2.0, pytest.approx(2 - half), pytest.approx(2 + half))
    assert np.isnan(stats.t_interval([0.9])[1])


def test_the_comparison_over_seeds_is_a_t_interval_and_test_on_the_per_seed_differences():
    per_seed = [stats.Paired(100, 0.80, 0.80 + d, d, d - 0.05, d + 0.05, 0.5, "McNemar exact")
                for d in (0.02, 0.04, 0.06)]
    over = stats.seed_comparison(per_seed)
    # mean 0.04, standard error 0.02 / sqrt(3), t(0.975, 2 df) = 4.303; t = 0.04 / 0.01155 = 3.46, p = 0.074
    assert over.difference == pytest.approx(0.04) and over.accuracy_b == pytest.approx(0.84) and over.n == 100
    assert (over.ci_low, over.ci_high) == pytest.approx((0.04 - 4.303 * 0.02 / 3 ** 0.5,
                                                         0.04 + 4.303 * 0.02 / 3 ** 0.5), abs=1e-4)
    assert over.p_value == pytest.approx(0.0742, abs=1e-3)
    same = stats.seed_comparison(per_seed[:1] * 2)  # no spread between seeds: no interval and no test
    assert same.difference == pytest.approx(0.02)
    assert np.isnan(same.ci_low) and np.isnan(same.ci_high) and np.isnan(same.p_value)


def test_holm_multiplies_the_ith_smallest_of_m_p_values_by_m_minus_i_plus_one_and_keeps_them_in_order():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> raised to the 0.06 before it
    assert list(stats.holm([0.01, 0.04, 0.03, 0.005])) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert list(stats.holm([0.3, 0.6])) == pytest.approx([0.6, 0.6])  # capped at 1 only when it is over
    assert list(stats.holm([0.7, 0.9])) == [1.0, 1.0]
    adjusted = stats.holm([0.02, np.nan, 0.04])  # a comparison without a test is not counted in the family
    assert list(adjusted[[0, 2]]) == pytest.approx([0.04, 0.04]) and np.isnan(adjusted[1])
    assert len(stats.holm([])) == 0
    assert list(stats.holm([0.01, 0.01, 0.04])) == pytest.approx([0.03, 0.03, 0.04])  # ties: the same value
