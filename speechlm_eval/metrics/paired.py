"""Paired gap statistics over per-item scores: point gap, paired bootstrap CI and a paired significance test.

Used for forgetting (text LLM vs speech LLM on text) and inequivalence (speech LLM on text vs on speech).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np

from speechlm_eval.records import json_safe

PairedTest = Literal["mcnemar-exact", "wilcoxon", "none"]

# Upper bound on resampled index entries held at once (int64 indices + float64 gathered values ≈ 16 B each),
# so ~64 MiB per chunk whatever n is. Chunking does not change the draws: numpy's stream is consumed row by row.
_MAX_CHUNK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class GapEstimate:
    """A paired gap `scale*(mean(a) - mean(b))` with its bootstrap CI and paired test.

    `n == 0` (see `empty`) gives NaN value/CI/p-value, `relative=None` and `test="none"`.
    """

    value: float
    ci_low: float
    ci_high: float
    p_value: float
    test: PairedTest
    n: int
    relative: float | None
    n_resamples: int
    seed: int
    confidence: float = 0.95

    @property
    def empty(self) -> bool:
        """True when there were no items, so every statistic is undefined."""
        return self.n == 0

    def to_dict(self) -> dict[str, float | int | str | bool | None]:
        """JSON-safe dict: plain Python numbers, non-finite floats as None, plus the `empty` flag."""
        out = {key: json_safe(val) for key, val in asdict(self).items()}
        out["empty"] = self.empty
        return out


def paired_gap(
    a: np.ndarray,
    b: np.ndarray,
    *,
    scale: float = 1.0,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> GapEstimate:
    """Gap `scale*(mean(a) - mean(b))` between two arms scored on the same items.

    Args:
        a, b: per-item scores, shape (n,), aligned by item (0/1 accuracies or graded scores such as 1-5).
        scale: multiplies the gap and its CI (e.g. 100 for percentage points).
        n_resamples: bootstrap resamples; item indices are drawn jointly for both arms (paired).
        confidence: two-sided level of the percentile CI.
        seed: seed for `np.random.default_rng`; the result is deterministic given it.

    Returns:
        GapEstimate. The test is exact McNemar when both arms are in {0, 1}, else Wilcoxon signed-rank.
        `relative` is `value / (scale*mean(a))`, None when that denominator is 0.
    """
    a_arr, b_arr = _validate_pair(a, b)
    _validate_settings(n_resamples, confidence)
    n = a_arr.size
    if n == 0:
        return GapEstimate(
            value=math.nan, ci_low=math.nan, ci_high=math.nan, p_value=math.nan, test="none", n=0,
            relative=None, n_resamples=n_resamples, seed=seed, confidence=confidence,
        )
    value = scale * (float(a_arr.mean()) - float(b_arr.mean()))
    # Resampling the per-item differences is exactly resampling both arms with the same indices.
    ci_low, ci_high = _bootstrap_mean_ci(a_arr - b_arr, scale, n_resamples, confidence, seed)
    test, p_value = _paired_test(a_arr, b_arr)
    baseline = scale * float(a_arr.mean())
    return GapEstimate(
        value=value, ci_low=ci_low, ci_high=ci_high, p_value=p_value, test=test, n=n,
        relative=None if baseline == 0 else value / baseline,
        n_resamples=n_resamples, seed=seed, confidence=confidence,
    )


def mean_ci(
    x: np.ndarray,
    scale: float = 1.0,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """`(scale*mean(x), low, high)`: one arm's mean with a percentile bootstrap CI (for arm bars).

    Args:
        x: per-item scores, shape (n,). n == 0 gives (nan, nan, nan).
    """
    arr = _as_scores(x, "x")
    _validate_settings(n_resamples, confidence)
    if arr.size == 0:
        return math.nan, math.nan, math.nan
    low, high = _bootstrap_mean_ci(arr, scale, n_resamples, confidence, seed)
    return scale * float(arr.mean()), low, high


def recovered(gap_before: float, gap_after: float) -> float | None:
    """Fraction of a gap closed by an intervention: `1 - after/before`.

    None when `gap_before <= 0` (nothing to recover) or either gap is not finite.
    """
    if not (math.isfinite(gap_before) and math.isfinite(gap_after)) or gap_before <= 0:
        return None
    return 1.0 - gap_after / gap_before


def _bootstrap_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """Means of `n_resamples` bootstrap resamples of `x`, shape (n_resamples,); `x` has shape (n,), n >= 1.

    Indices are `default_rng(seed).integers(0, n, size=(n_resamples, n))`, drawn in row chunks to bound memory.
    """
    n = x.size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_CHUNK_ENTRIES // n)
    means = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows_per_chunk):
        stop = min(start + rows_per_chunk, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = x[idx].mean(axis=1)
    return means


def _bootstrap_mean_ci(
    x: np.ndarray, scale: float, n_resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile CI of `scale*mean(x)` for x of shape (n,), n >= 1."""
    alpha = 1.0 - confidence
    means = scale * _bootstrap_means(x, n_resamples, seed)
    low, high = np.quantile(means, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


def _paired_test(a: np.ndarray, b: np.ndarray) -> tuple[PairedTest, float]:
    """Exact McNemar for binary arms, else Wilcoxon signed-rank; a, b have shape (n,), n >= 1."""
    from scipy import stats  # imported on first use: scipy.stats alone costs ~0.6 s of every command's start-up

    if _is_binary(a) and _is_binary(b):
        b10 = int(np.sum((a == 1) & (b == 0)))
        b01 = int(np.sum((a == 0) & (b == 1)))
        if b10 + b01 == 0:
            return "mcnemar-exact", 1.0
        return "mcnemar-exact", float(stats.binomtest(b10, b10 + b01, 0.5).pvalue)
    if np.all(a == b):
        # scipy cannot rank an all-zero difference vector; identical arms are no evidence of a gap.
        return "wilcoxon", 1.0
    return "wilcoxon", float(stats.wilcoxon(a, b).pvalue)


def _is_binary(x: np.ndarray) -> bool:
    return bool(np.all((x == 0) | (x == 1)))


def _as_scores(x: np.ndarray, name: str) -> np.ndarray:
    """Validate one arm: 1-D, finite, numeric; returned as float64 of shape (n,)."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D per-item scores, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite scores; drop or score those items first")
    return arr


def _validate_pair(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a_arr, b_arr = _as_scores(a, "a"), _as_scores(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be aligned by item, got shapes {a_arr.shape} and {b_arr.shape}")
    return a_arr, b_arr


def _validate_settings(n_resamples: int, confidence: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
