"""Statistics for honest comparisons: intervals on accuracies and paired tests between two models on the same images.

- Intervals on one model's accuracy and mean per-class accuracy: a seeded percentile bootstrap over the images
  (RESAMPLES resamples). The seed is fixed, so the same predictions always give the same interval.
- Two models on the same images: the difference with a paired-bootstrap interval (each resample takes the same
  images for both), and McNemar's exact two-sided test on the images where exactly one of them is right.
- Several seeds' differences on the same images, pooled: the mean difference per image, a paired-bootstrap
  interval over the images, and a sign-flip permutation test of the per-image differences.
- A handful of values (seeds, folds): Student's t interval on their mean.
- Many comparisons in one family: Holm's step-down adjustment of their p-values, so that the chance of calling
  any true "no difference" of the family a difference is at most 5 % however many are tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

RESAMPLES = 2000
PERMUTATIONS = 10000
LEVEL = 0.95
SEED = 0
_CHUNK = 250  # resamples drawn at a time, to bound memory (250 x 6,149 indices is 12 MB)


def _resamples(n: int, resamples: int, seed: int):
    """Chunks of bootstrap resamples: [chunk, n] indices of n items drawn with replacement."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, _CHUNK):
        yield rng.integers(0, n, size=(min(_CHUNK, resamples - start), n))


def _percentiles(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return float(low), float(high)


def mean_class_accuracy(correct: np.ndarray, labels: np.ndarray) -> float:
    """The mean over classes of each class's accuracy (classes without images left out)."""
    totals = np.bincount(labels)
    hits = np.bincount(labels, weights=correct.astype(float), minlength=len(totals))
    present = totals > 0
    return float((hits[present] / totals[present]).mean())


def accuracy_interval(correct: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> tuple[float, float]:
    correct = np.asarray(correct, dtype=float)
    means = np.concatenate([correct[idx].mean(axis=1) for idx in _resamples(len(correct), resamples, seed)])
    return _percentiles(means)


def mean_class_interval(correct: np.ndarray, labels: np.ndarray, resamples: int = RESAMPLES,
                        seed: int = SEED) -> tuple[float, float]:
    """A class that a resample happens to miss is left out of that resample's mean."""
    correct, labels = np.asarray(correct, dtype=float), np.asarray(labels)
    classes = int(labels.max()) + 1
    values = []
    for idx in _resamples(len(correct), resamples, seed):
        rows = np.arange(len(idx))[:, None] * classes
        flat = (labels[idx] + rows).ravel()
        totals = np.bincount(flat, minlength=len(idx) * classes).reshape(len(idx), classes)
        hits = np.bincount(flat, weights=correct[idx].ravel(), minlength=len(idx) * classes).reshape(len(idx), classes)
        with np.errstate(invalid="ignore", divide="ignore"):
            values.append(np.nanmean(np.where(totals > 0, hits / totals, np.nan), axis=1))
    return _percentiles(np.concatenate(values))


@dataclass(frozen=True)
class Paired:
    """B against A on the same n images."""
    n: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # B - A
    ci_low: float
    ci_high: float
    p_value: float
    test: str  # how p_value was computed

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def paired_comparison(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = RESAMPLES,
                      seed: int = SEED) -> Paired:
    """One model against another on the same images: B - A with a paired-bootstrap interval, and McNemar's exact
    test (a two-sided binomial test on the images where exactly one model is right)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    difference = b.astype(float) - a
    low, high = _percentiles(np.concatenate([difference[idx].mean(axis=1)
                                             for idx in _resamples(len(a), resamples, seed)]))
    return Paired(len(a), float(a.mean()), float(b.mean()), float(difference.mean()), low, high,
                  mcnemar_exact(a, b), "McNemar exact")


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    only_a = int(np.sum(correct_a & ~correct_b))
    only_b = int(np.sum(~correct_a & correct_b))
    if only_a + only_b == 0:
        return 1.0
    return float(stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def pooled_comparison(correct_a: np.ndarray, correct_b: np.ndarray, resamples: int = RESAMPLES,
                      permutations: int = PERMUTATIONS, seed: int = SEED) -> Paired:
    """Several seeds of A against several of B on the same images ([seeds, images] arrays, not necessarily as
    many seeds each): each image's mean correctness over the seeds, B - A with a paired-bootstrap interval over
    the images, and a two-sided sign-flip permutation test of the per-image differences (under "no difference",
    each image's difference is as likely to have either sign)."""
    a, b = np.asarray(correct_a, dtype=float).mean(axis=0), np.asarray(correct_b, dtype=float).mean(axis=0)
    difference = b - a
    low, high = _percentiles(np.concatenate([difference[idx].mean(axis=1)
                                             for idx in _resamples(len(a), resamples, seed)]))
    observed = abs(difference.sum())
    rng = np.random.default_rng(seed)
    extreme = sum(int(np.sum(np.abs((rng.choice([-1.0, 1.0], size=(min(_CHUNK, permutations - start), len(a)))
                                     * difference).sum(axis=1)) >= observed - 1e-9))
                  for start in range(0, permutations, _CHUNK))
    return Paired(len(a), float(a.mean()), float(b.mean()), float(difference.mean()), low, high,
                  (extreme + 1) / (permutations + 1), f"sign-flip permutation, {permutations} draws")


def seed_comparison(per_seed: list[Paired]) -> Paired:
    """Per-seed comparisons taken as a sample of training runs: the mean of their differences with a Student's t
    interval and a one-sample t-test. It counts what the pooled interval over images leaves out, how much
    training runs of one configuration vary; the images stay the same. With 2 or 3 seeds it is wide."""
    differences = np.array([paired.difference for paired in per_seed])
    mean, low, high = t_interval(differences)
    if differences.std() == 0:  # seeds that all differ alike (a deterministic head) measure no spread
        low = high = p_value = float("nan")
    else:
        p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    return Paired(per_seed[0].n, float(np.mean([p.accuracy_a for p in per_seed])),
                  float(np.mean([p.accuracy_b for p in per_seed])), mean, low, high, p_value,
                  f"one-sample t over {len(per_seed)} seeds")


def t_interval(values, level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, low, high): Student's t interval on the mean of a few values (seeds, folds); nan bounds below 2."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = stats.t.ppf((1 + level) / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment of a family of p-values (NaN ones are left out of the family and stay NaN): the
    i-th smallest of m is multiplied by m - i + 1, kept at least as large as the one before it, and capped at 1."""
    p_values = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p_values, np.nan)
    tested = np.flatnonzero(~np.isnan(p_values))
    order = tested[np.argsort(p_values[tested], kind="stable")]
    factors = len(order) - np.arange(len(order))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(factors * p_values[order]))
    return adjusted
