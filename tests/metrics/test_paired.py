"""Tests for paired gap statistics against naive re-computations (python-loop bootstrap, direct scipy calls)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from speechlm_eval.metrics import paired
from speechlm_eval.metrics.paired import GapEstimate, mean_ci, paired_gap, recovered


def _naive_quantile(sorted_vals: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default rule), written out by hand."""
    pos = q * (len(sorted_vals) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (pos - lo) * (sorted_vals[hi] - sorted_vals[lo])


def _naive_paired_ci(a: list[float], b: list[float], scale: float, n_resamples: int, confidence: float,
                     seed: int) -> tuple[float, float]:
    """One resample at a time, both arms indexed by the same draw, means by python sums."""
    rng = np.random.default_rng(seed)
    n = len(a)
    gaps = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, size=n)
        mean_a = sum(a[i] for i in idx) / n
        mean_b = sum(b[i] for i in idx) / n
        gaps.append(scale * (mean_a - mean_b))
    gaps.sort()
    alpha = 1.0 - confidence
    return _naive_quantile(gaps, alpha / 2), _naive_quantile(gaps, 1 - alpha / 2)


def _naive_single_ci(x: list[float], scale: float, n_resamples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    n = len(x)
    means = sorted(scale * sum(x[i] for i in rng.integers(0, n, size=n)) / n for _ in range(n_resamples))
    return _naive_quantile(means, 0.025), _naive_quantile(means, 0.975)


@pytest.fixture
def binary_arms() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    a = (rng.random(60) < 0.7).astype(float)
    b = (rng.random(60) < 0.5).astype(float)
    return a, b


@pytest.fixture
def graded_arms() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    a = rng.integers(1, 6, size=40).astype(float)
    b = np.clip(a - rng.integers(0, 3, size=40), 1, 5).astype(float)
    return a, b


# --- bootstrap CI against a naive loop -------------------------------------------------------------------------

@pytest.mark.parametrize("arms", ["binary_arms", "graded_arms"])
def test_bootstrap_ci_matches_naive_loop(arms: str, request: pytest.FixtureRequest) -> None:
    a, b = request.getfixturevalue(arms)
    est = paired_gap(a, b, scale=100.0, n_resamples=500, confidence=0.9, seed=5)
    low, high = _naive_paired_ci(a.tolist(), b.tolist(), 100.0, 500, 0.9, 5)
    assert est.ci_low == pytest.approx(low, abs=1e-9)
    assert est.ci_high == pytest.approx(high, abs=1e-9)
    assert est.value == pytest.approx(100.0 * (a.mean() - b.mean()))
    assert est.ci_low < est.value < est.ci_high


def test_chunked_draws_give_the_same_ci(binary_arms: tuple[np.ndarray, np.ndarray],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = binary_arms
    whole = paired_gap(a, b, n_resamples=301, seed=3)
    # 7 entries per chunk forces one resample row per chunk and many chunks.
    monkeypatch.setattr(paired, "_MAX_CHUNK_ENTRIES", 7)
    chunked = paired_gap(a, b, n_resamples=301, seed=3)
    assert (chunked.ci_low, chunked.ci_high) == (whole.ci_low, whole.ci_high)


def test_deterministic_given_seed(graded_arms: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = graded_arms
    first = paired_gap(a, b, n_resamples=400, seed=11)
    assert paired_gap(a, b, n_resamples=400, seed=11) == first
    other = paired_gap(a, b, n_resamples=400, seed=12)
    assert (other.ci_low, other.ci_high) != (first.ci_low, first.ci_high)
    assert other.value == first.value and other.p_value == first.p_value


def test_paired_resampling_gives_zero_width_ci_for_perfectly_correlated_arms() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(1, 6, size=50).astype(float)
    b = a - 0.5
    est = paired_gap(a, b, n_resamples=1000, seed=0)
    assert est.ci_low == est.ci_high == pytest.approx(0.5)
    # Resampling the arms independently (unpaired) would report a wide interval for the same data.
    ia = rng.integers(0, 50, size=(1000, 50))
    ib = rng.integers(0, 50, size=(1000, 50))
    unpaired = a[ia].mean(axis=1) - b[ib].mean(axis=1)
    low, high = np.quantile(unpaired, [0.025, 0.975])
    assert high - low > 0.5


# --- paired tests ------------------------------------------------------------------------------------------------

def test_mcnemar_counts_and_p_value_by_hand() -> None:
    # 7 items only a is right (b10), 2 only b is right (b01), 5 both right, 6 both wrong.
    a = np.array([1] * 7 + [0] * 2 + [1] * 5 + [0] * 6, dtype=float)
    b = np.array([0] * 7 + [1] * 2 + [1] * 5 + [0] * 6, dtype=float)
    est = paired_gap(a, b, n_resamples=200)
    assert est.test == "mcnemar-exact"
    # Two-sided exact binomial for 7 of 9 at 0.5: 2 * (C(9,7) + C(9,8) + C(9,9)) / 2**9.
    assert est.p_value == pytest.approx(2 * (36 + 9 + 1) / 512)
    assert est.p_value == pytest.approx(stats.binomtest(7, 9, 0.5).pvalue)
    assert est.value == pytest.approx((12 - 7) / 20)


def test_mcnemar_on_random_binary_matches_binomtest(binary_arms: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = binary_arms
    b10 = sum(1 for x, y in zip(a, b) if x == 1 and y == 0)
    b01 = sum(1 for x, y in zip(a, b) if x == 0 and y == 1)
    est = paired_gap(a, b, n_resamples=100)
    assert est.p_value == pytest.approx(stats.binomtest(b10, b10 + b01, 0.5).pvalue)


def test_mcnemar_without_discordant_pairs_has_p_one() -> None:
    a = np.array([1, 0, 1, 1, 0], dtype=float)
    est = paired_gap(a, a.copy(), n_resamples=100)
    assert est.test == "mcnemar-exact"
    assert est.p_value == 1.0
    assert (est.value, est.ci_low, est.ci_high) == (0.0, 0.0, 0.0)


def test_graded_scores_use_wilcoxon(graded_arms: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = graded_arms
    est = paired_gap(a, b, n_resamples=100)
    assert est.test == "wilcoxon"
    assert est.p_value == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert est.p_value < 0.01  # b is a minus a non-negative amount on most items


def test_one_binary_arm_and_one_graded_arm_use_wilcoxon() -> None:
    a = np.array([1, 0, 1, 1, 0, 1, 1, 1], dtype=float)
    b = np.array([0.5, 0, 1, 0, 0, 0.5, 1, 0], dtype=float)
    est = paired_gap(a, b, n_resamples=100)
    assert est.test == "wilcoxon"
    assert est.p_value == pytest.approx(stats.wilcoxon(a, b).pvalue)


def test_wilcoxon_with_all_differences_zero_has_p_one() -> None:
    a = np.array([3.0, 4.0, 2.5, 5.0])
    est = paired_gap(a, a.copy(), n_resamples=100)
    assert est.test == "wilcoxon"
    assert est.p_value == 1.0
    assert (est.value, est.ci_low, est.ci_high) == (0.0, 0.0, 0.0)


# --- edge cases, validation, relative form ------------------------------------------------------------------------

def test_empty_input_is_all_undefined_and_flagged() -> None:
    est = paired_gap(np.array([]), np.array([]), n_resamples=50, seed=4)
    assert est.empty and est.n == 0 and est.test == "none" and est.relative is None
    assert all(math.isnan(v) for v in (est.value, est.ci_low, est.ci_high, est.p_value))
    d = est.to_dict()
    assert d["empty"] is True
    assert d["value"] is None and d["ci_low"] is None and d["ci_high"] is None and d["p_value"] is None
    assert d["n_resamples"] == 50 and d["seed"] == 4
    json.dumps(d, allow_nan=False)


def test_single_item_ci_equals_point() -> None:
    est = paired_gap(np.array([4.0]), np.array([2.5]), scale=2.0, n_resamples=100)
    assert est.n == 1 and not est.empty
    assert est.value == est.ci_low == est.ci_high == 3.0


def test_relative_gap() -> None:
    a = np.array([1, 1, 1, 1, 0], dtype=float)  # mean 0.8
    b = np.array([1, 1, 1, 0, 0], dtype=float)  # mean 0.6
    plain = paired_gap(a, b, n_resamples=100)
    scaled = paired_gap(a, b, scale=100.0, n_resamples=100)
    assert plain.relative == pytest.approx(0.25)
    assert scaled.relative == pytest.approx(0.25)
    assert scaled.value == pytest.approx(20.0)
    assert paired_gap(np.zeros(5), b, n_resamples=100).relative is None


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (np.array([1.0, np.nan, 0.0]), np.array([1.0, 0.0, 0.0])),
        (np.array([1.0, 0.0, 0.0]), np.array([np.nan, 0.0, 0.0])),
        (np.array([1.0, 0.0, 0.0]), np.array([np.inf, 0.0, 0.0])),
        (np.array([1.0, 0.0, 0.0]), np.array([1.0, 0.0])),
        (np.ones((2, 3)), np.ones((2, 3))),
    ],
)
def test_invalid_inputs_raise(a: np.ndarray, b: np.ndarray) -> None:
    with pytest.raises(ValueError):
        paired_gap(a, b)


def test_nan_error_message_is_clear() -> None:
    with pytest.raises(ValueError, match="NaN"):
        paired_gap(np.array([np.nan]), np.array([1.0]))
    with pytest.raises(ValueError, match="shapes"):
        paired_gap(np.array([1.0]), np.array([1.0, 0.0]))


@pytest.mark.parametrize("kwargs", [{"n_resamples": 0}, {"confidence": 1.0}, {"confidence": 0.0}])
def test_invalid_settings_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        paired_gap(np.ones(3), np.zeros(3), **kwargs)


def test_to_dict_is_json_safe(graded_arms: tuple[np.ndarray, np.ndarray]) -> None:
    a, b = graded_arms
    est = paired_gap(a, b, n_resamples=100)
    d = est.to_dict()
    assert all(type(d[k]) is float for k in ("value", "ci_low", "ci_high", "p_value", "relative", "confidence"))
    assert type(d["n"]) is int and d["test"] == "wilcoxon" and d["empty"] is False
    assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert GapEstimate(**{k: v for k, v in d.items() if k != "empty"}) == est


# --- single-arm CI and recovery ------------------------------------------------------------------------------------

def test_mean_ci_matches_naive_loop(graded_arms: tuple[np.ndarray, np.ndarray]) -> None:
    x = graded_arms[0]
    value, low, high = mean_ci(x, 20.0, 300, 9)
    naive_low, naive_high = _naive_single_ci(x.tolist(), 20.0, 300, 9)
    assert value == pytest.approx(20.0 * x.mean())
    assert (low, high) == (pytest.approx(naive_low, abs=1e-9), pytest.approx(naive_high, abs=1e-9))


def test_mean_ci_edge_cases() -> None:
    assert all(math.isnan(v) for v in mean_ci(np.array([]), 1.0, 10, 0))
    assert mean_ci(np.array([0.4]), 100.0, 10, 0) == pytest.approx((40.0, 40.0, 40.0))
    with pytest.raises(ValueError, match="NaN"):
        mean_ci(np.array([1.0, np.nan]))


def test_recovered() -> None:
    assert recovered(10.0, 4.0) == pytest.approx(0.6)
    assert recovered(10.0, 0.0) == 1.0
    assert recovered(10.0, 15.0) == pytest.approx(-0.5)  # the intervention widened the gap
    assert recovered(0.0, 1.0) is None
    assert recovered(-2.0, 1.0) is None
    assert recovered(math.nan, 1.0) is None


def test_metrics_module_does_not_import_torch() -> None:
    code = "import sys, speechlm_eval.metrics.paired; sys.exit('torch' in sys.modules)"
    repo_root = Path(__file__).resolve().parents[2]
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root, check=False).returncode == 0
