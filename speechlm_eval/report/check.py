"""CI gate on model releases: compare a candidate gap run with a baseline run item by item, and flag a subset whose
score drops (or whose forgetting/inequivalence gap grows) by more than a threshold with a significant paired test.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from speechlm_eval.metrics.paired import GapEstimate, paired_gap
from speechlm_eval.metrics.overall import POINTS_SCALE
from speechlm_eval.report.build import run_item_scores
from speechlm_eval.rundir import ARMS, GAPS, ItemRow, RunDir
from speechlm_eval.scoring.registry import Scorer, get_scorer

MAX_IDS_SHOWN = 10

Verdict = Literal["FAIL", "pass"]


class CheckError(ValueError):
    """Runs that cannot be compared at all (exit 2): a missing run or file, a run without records, corrupt records,
    a bad option, a baseline arm with nothing scored."""


DEFAULT_MAX_ERROR_RATE = 2.0
POWER = 0.8  # the power at which the minimum detectable drop is quoted


@dataclass
class CheckConfig:
    """``speechlm-eval check``: the two runs and the gate's thresholds."""

    baseline: Path = field(metadata={"help": "Run directory of the released (baseline) model."})
    candidate: Path = field(metadata={"help": "Run directory of the candidate model, on the same items."})
    max_drop: float = field(default=1.0, metadata={
        "help": "Largest tolerated drop of a score (or growth of a gap), in points on a 0-100 scale: accuracies in "
                "%, advbench refusal_rate x100, open-ended 1-5 judge means x20."})
    alpha: float = field(default=0.05, metadata={
        "help": "Significance level of the two-sided paired test (McNemar / Wilcoxon); CIs are at 1-alpha."})
    max_error_rate: float = field(default=DEFAULT_MAX_ERROR_RATE, metadata={
        "help": "FAIL when an arm's share of unusable answers (error records, missing records, unparsed or unjudged "
                "responses) in the candidate exceeds the baseline's by more than this many points (0-100)."})
    noise_from: list[str] = field(default_factory=list, metadata={
        "help": "RUN1,RUN2: two repeat runs of one model (e.g. the baseline twice). Each row's threshold becomes "
                "max(--max-drop, the largest |bound| of the CI of RUN2 - RUN1 on that row): run-to-run noise is "
                "not a regression.", "comma": True})
    subsets: list[str] = field(default_factory=list, metadata={
        "help": "Compare only these subsets (repeatable; default: every subset of the baseline).",
        "flag": "--subset"})


@dataclass(frozen=True)
class Comparison:
    """Candidate vs baseline on one subset, for one arm's score or one gap, in points.

    Attributes:
        quantity: an arm (``speech_llm_speech``, ...) or a gap (``forgetting``, ``inequivalence``).
        kind: ``arm`` (worse = lower) or ``gap`` (worse = larger).
        n: items scored in every arm involved, in both runs (the paired items).
        baseline, candidate: the arm score (or gap) over those items.
        delta: ``candidate - baseline`` with its paired bootstrap CI and two-sided paired-test p-value.
        worse_by: how much worse the candidate is (``-delta`` for arms, ``delta`` for gaps); negative = better.
        threshold: the tolerated worsening of this row (``--max-drop``, or the repeat-run noise when larger).
        mde: the minimum detectable worsening at this n (see :func:`minimum_detectable`).
    """

    subset: str
    quantity: str
    kind: Literal["arm", "gap"]
    n: int
    baseline: float
    candidate: float
    delta: float
    ci_low: float
    ci_high: float
    p_value: float
    test: str
    worse_by: float
    verdict: Verdict
    reason: str
    threshold: float = 0.0
    mde: float = math.nan


@dataclass(frozen=True)
class GateFailure:
    """A reason the candidate cannot pass that is not a score comparison: it lacks a subset or an arm the baseline
    has, answered different items, has too many unusable answers, or did not hear its audio."""

    subset: str
    what: str
    reason: str

    def line(self) -> str:
        return f"{self.subset} · {self.what}: {self.reason}"


@dataclass(frozen=True)
class CheckReport:
    """Every comparison of two runs, the gate failures, the gate's settings and notes on what was not compared."""

    baseline: str
    candidate: str
    max_drop: float
    alpha: float
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)
    failures: list[GateFailure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    max_error_rate: float = DEFAULT_MAX_ERROR_RATE
    coverage: list[dict[str, Any]] = field(default_factory=list)
    noise_from: tuple[str, ...] = ()

    @property
    def failed(self) -> bool:
        return bool(self.failures) or any(c.verdict == "FAIL" for c in self.comparisons)


# ---------------------------------------------------------------------------------------------------- loading


def load_run_scores(run_dir: Path) -> dict[str, Any]:
    """:func:`run_item_scores` of a run, with :class:`CheckError` for anything that makes it unusable."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    if not run_dir.is_dir():
        raise CheckError(f"{run_dir}: no such run directory")
    for path in (run.manifest_path, run.items_path):
        if not path.is_file():
            raise CheckError(f"{run_dir} is not a run directory (no {path.name})")
    if not any(run.records_path(arm).is_file() for arm in ARMS):
        raise CheckError(f"{run_dir} has no records (records/<arm>.jsonl): a run without results cannot be compared")
    try:
        return run_item_scores(run_dir)
    except (ValueError, LookupError) as error:  # bad records/JSON, missing fields, judged subsets without judgements
        raise CheckError(f"{run_dir}: cannot score the run ({error})") from None


def points_scale(scorer: Scorer) -> float:
    """Multiplier from mean per-item value to points (0-100 for every built-in metric; the metric's own units else)."""
    return POINTS_SCALE.get(scorer.name, scorer.scale)


def _model_ids(manifest: Mapping[str, Any]) -> str:
    models = manifest.get("models", {})
    return ", ".join(f"{role}={m.get('id')}" for role, m in models.items() if isinstance(m, Mapping))


# ---------------------------------------------------------------------------------------------------- pairing


def _ids_listing(ids: Sequence[str]) -> str:
    shown = ", ".join(sorted(ids)[:MAX_IDS_SHOWN])
    more = f" (+{len(ids) - MAX_IDS_SHOWN} more)" if len(ids) > MAX_IDS_SHOWN else ""
    return f"{len(ids)}: {shown}{more}"


def item_set_difference(subset: str, baseline_rows: list[ItemRow], candidate_rows: list[ItemRow]) -> str | None:
    """Why the two runs did not answer the same items of ``subset`` (different ids, or the same ids with a different
    question or reference), naming the differing ids; ``None`` when they did."""
    base_ids = {r.id for r in baseline_rows}
    cand_ids = {r.id for r in candidate_rows}
    parts = []
    if base_ids - cand_ids:
        parts.append(f"only in baseline {_ids_listing(list(base_ids - cand_ids))}")
    if cand_ids - base_ids:
        parts.append(f"only in candidate {_ids_listing(list(cand_ids - base_ids))}")
    if parts:
        return f"the runs have different item sets ({'; '.join(parts)})"
    # Same ids can still be different questions (e.g. VoiceBench's bbh was re-uploaded): compare what was asked.
    base_content = {r.id: _content(r) for r in baseline_rows}
    changed = [r.id for r in candidate_rows if _content(r) != base_content[r.id]]
    if changed:
        return ("items with the same id differ in text, choices or reference between the runs (different data "
                f"revisions?): {_ids_listing(changed)}")
    return None


def check_same_items(subset: str, baseline_rows: list[ItemRow], candidate_rows: list[ItemRow]) -> None:
    """:class:`CheckError` when :func:`item_set_difference` finds the two runs answered different items."""
    difference = item_set_difference(subset, baseline_rows, candidate_rows)
    if difference is not None:
        raise CheckError(f"subset {subset}: {difference}")


def _content(row: ItemRow) -> tuple[Any, ...]:
    return (row.text, row.audio_instruction, tuple(row.choices), row.reference)


def _paired_values(score_maps: Sequence[Mapping[str, Any]], ids: Sequence[str]) -> tuple[list[str], list[np.ndarray]]:
    """The ids scored in every map (not None, and finite: an open item whose judge outputs all failed to parse is
    NaN), and each map's values on them, aligned."""
    kept = [i for i in ids if all(m.get(i) is not None and math.isfinite(m[i].value) for m in score_maps)]
    return kept, [np.array([m[i].value for i in kept], dtype=float) for m in score_maps]


def judge(kind: str, delta: float, p_value: float, max_drop: float, alpha: float) -> tuple[Verdict, str, float]:
    """``(verdict, reason, worse_by)``: FAIL only when worse by more than ``max_drop`` AND ``p < alpha``."""
    worse_by = -delta if kind == "arm" else delta
    worse = "drop" if kind == "arm" else "gap growth"
    if worse_by > max_drop and p_value < alpha:
        return "FAIL", f"{worse} {worse_by:.2f} > {max_drop:g} and p < {alpha:g}", worse_by
    if worse_by > max_drop:
        return "pass", f"{worse} {worse_by:.2f} > {max_drop:g} but not significant", worse_by
    if worse_by > 0:
        return "pass", f"{worse} within the threshold", worse_by
    return "pass", "no regression", worse_by


def smallest_significant_count(alpha: float) -> int:
    """The fewest discordant items that can give a two-sided exact paired test p < ``alpha`` (all one way:
    p = 2 · 0.5^k): 6 at alpha 0.05. Below it no drop, however large, can fail the gate."""
    return max(1, math.floor(math.log2(2.0 / alpha)) + 1)


def minimum_detectable(baseline: np.ndarray, scale: float, alpha: float, power: float = POWER) -> float:
    """The smallest worsening (points) that ``n`` paired items detect with ``power`` at two-sided ``alpha``.

    ``(z_{1-alpha/2} + z_power) · sd(d) / sqrt(n)``, with the per-item difference variance taken as twice the
    baseline's per-item variance (the two runs' errors independent, the conservative case); never below
    :func:`smallest_significant_count` items' worth, the least any exact paired test can call significant.
    """
    from scipy.stats import norm

    n = int(baseline.size)
    if n == 0:
        return math.inf
    variance = 2.0 * float(np.var(baseline))
    z = float(norm.ppf(1.0 - alpha / 2.0) + norm.ppf(power))
    return scale * max(z * math.sqrt(variance / n), smallest_significant_count(alpha) / n)


def _mean_points(values: np.ndarray, scale: float) -> float:
    return scale * float(values.mean())


def _comparison(subset: str, quantity: str, kind: Literal["arm", "gap"], base: np.ndarray, cand: np.ndarray,
                scale: float, settings: Mapping[str, Any]) -> Comparison:
    """Compare aligned per-item values (arm scores or per-item gap contributions, n >= 1) of the two runs."""
    estimate: GapEstimate = paired_gap(cand, base, scale=scale, n_resamples=settings["n_resamples"],
                                       confidence=1.0 - settings["alpha"], seed=settings["seed"])
    delta, p_value = estimate.value, estimate.p_value
    threshold = max(settings["max_drop"], settings["noise"].get((subset, quantity), 0.0))
    verdict, reason, worse_by = judge(kind, delta, p_value, threshold, settings["alpha"])
    return Comparison(subset=subset, quantity=quantity, kind=kind, n=estimate.n, baseline=_mean_points(base, scale),
                      candidate=_mean_points(cand, scale), delta=delta, ci_low=estimate.ci_low,
                      ci_high=estimate.ci_high, p_value=p_value, test=estimate.test, worse_by=worse_by,
                      verdict=verdict, reason=reason, threshold=threshold,
                      mde=minimum_detectable(base, scale, settings["alpha"]))


def _present_arms(run: Mapping[str, Any], subset: str) -> set[str]:
    """Arms with at least one record (errored or not) for ``subset`` in a run."""
    return {arm for arm, n in run["recorded"].get(subset, {}).items() if n > 0}


def unusable_counts(scores: Mapping[str, Any], records: Mapping[str, Mapping[str, Any]],
                    ids: Sequence[str]) -> dict[str, int]:
    """How many of ``ids`` give no usable answer in one arm: no record, an error record, a response the official
    rule could not parse (scored by a seeded draw) or could not score (e.g. not judged)."""
    missing = sum(1 for i in ids if i not in records)
    errors = sum(1 for i in ids if i in records and records[i].get("error") is not None)
    unscored = sum(1 for i in ids if i in records and records[i].get("error") is None and scores.get(i) is None)
    unparsed = sum(1 for i in ids if scores.get(i) is not None and not scores[i].parsed)
    return {"n": len(ids), "missing": missing, "errors": errors, "unparsed": unparsed, "unscored": unscored,
            "unusable": missing + errors + unparsed + unscored}


def _rate(counts: Mapping[str, int]) -> float:
    return 100.0 * counts["unusable"] / counts["n"] if counts["n"] else 0.0


def _breakdown(counts: Mapping[str, int]) -> str:
    parts = [f"{counts[k]} {k}" for k in ("errors", "missing", "unparsed", "unscored") if counts[k]]
    return ", ".join(parts) or "none"


def coverage_rows(subset: str, base: Mapping[str, Any], cand: Mapping[str, Any], max_error_rate: float,
                  failures: list[GateFailure]) -> list[dict[str, Any]]:
    """Per arm of the baseline: its unusable-answer rate in both runs; a :class:`GateFailure` when the candidate
    lacks the arm or its rate exceeds the baseline's by more than ``max_error_rate`` points."""
    ids = [r.id for r in base["rows"][subset]]
    base_arms, cand_arms = _present_arms(base, subset), _present_arms(cand, subset)
    rows = []
    for arm in (a for a in ARMS if a in base_arms):
        base_counts = unusable_counts(base["scores"][subset][arm], base["records"].get(arm, {}), ids)
        if arm not in cand_arms:
            failures.append(GateFailure(subset, arm, "the baseline answered this arm, the candidate has no record "
                                                     "of it"))
            rows.append({"subset": subset, "arm": arm, "baseline": _rate(base_counts), "candidate": None,
                         "baseline_counts": base_counts, "candidate_counts": None})
            continue
        cand_counts = unusable_counts(cand["scores"][subset][arm], cand["records"].get(arm, {}), ids)
        rise = _rate(cand_counts) - _rate(base_counts)
        if rise > max_error_rate:
            failures.append(GateFailure(
                subset, arm, f"{_rate(cand_counts):.1f}% of {len(ids)} answers unusable in the candidate "
                f"({_breakdown(cand_counts)}) vs {_rate(base_counts):.1f}% in the baseline: +{rise:.1f} points > "
                f"--max-error-rate {max_error_rate:g}"))
        rows.append({"subset": subset, "arm": arm, "baseline": _rate(base_counts), "candidate": _rate(cand_counts),
                     "baseline_counts": base_counts, "candidate_counts": cand_counts})
    return rows


def _pair(subset: str, label: str, maps: Sequence[Mapping[str, Any]], ids: Sequence[str], notes: list[str],
          failures: list[GateFailure], baseline_maps: int) -> list[np.ndarray] | None:
    """Aligned values over the ids scored everywhere (a note for items left out); ``None`` when none is left.

    No item scored in the baseline (its first ``baseline_maps`` maps) makes the baseline unusable
    (:class:`CheckError`); none left because of the candidate is a gate failure unless one is already recorded.
    """
    kept, values = _paired_values(maps, ids)
    if not kept:
        if not _paired_values(maps[:baseline_maps], ids)[0]:
            raise CheckError(f"subset {subset}, {label}: no item is scored in the baseline run (every record is "
                             "missing or an error)")
        if not any(f.subset == subset for f in failures):
            failures.append(GateFailure(subset, label, "no item is scored in both runs"))
        return None
    if len(kept) < len(ids):
        notes.append(f"{subset} · {label}: {len(ids) - len(kept)} of {len(ids)} items unscored (error or no record) "
                     "in a run, left out of the pairing")
    return values


def compare_subset(subset: str, base: Mapping[str, Any], cand: Mapping[str, Any], scale: float,
                   settings: Mapping[str, Any], notes: list[str],
                   failures: list[GateFailure] | None = None) -> list[Comparison]:
    """Every arm with records in both runs, then every gap whose two arms have records in both runs."""
    failures = [] if failures is None else failures
    ids = [r.id for r in base["rows"][subset]]
    base_scores, cand_scores = base["scores"][subset], cand["scores"][subset]
    present = _present_arms(base, subset) & _present_arms(cand, subset)
    for arm in sorted(_present_arms(cand, subset) - _present_arms(base, subset)):
        notes.append(f"{subset} · {arm}: answered in the candidate only, not compared")
    out = []
    for arm in (a for a in ARMS if a in present):
        values = _pair(subset, arm, [base_scores[arm], cand_scores[arm]], ids, notes, failures, 1)
        if values is not None:
            out.append(_comparison(subset, arm, "arm", values[0], values[1], scale, settings))
    for gap, (first, second) in GAPS.items():
        if first in present and second in present:
            maps = [base_scores[first], base_scores[second], cand_scores[first], cand_scores[second]]
            values = _pair(subset, gap, maps, ids, notes, failures, 2)
            if values is not None:
                b1, b2, c1, c2 = values
                # A gap is the mean of per-item contributions first - second, so its change pairs those contributions.
                out.append(_comparison(subset, gap, "gap", b1 - b2, c1 - c2, scale, settings))
    return out


# ---------------------------------------------------------------------------------------------------- the gate


def _select_subsets(base: Mapping[str, Any], cand: Mapping[str, Any], requested: Sequence[str] | None,
                    notes: list[str], failures: list[GateFailure]) -> list[str]:
    """The subsets to compare: the requested ones, or every one the baseline scored. A subset the baseline scored
    and the candidate lacks (or cannot score) is a gate failure; one the baseline lacks is unusable input."""
    if requested:
        for subset in requested:
            if subset not in base["rows"]:
                raise CheckError(f"subset {subset!r} is not in the baseline run (it has: {', '.join(base['rows'])})")
            if subset in base["unscored"]:
                raise CheckError(f"subset {subset!r}: scorer {base['unscored'][subset]!r} is not available, "
                                 "so the baseline run cannot be scored")
        wanted = list(dict.fromkeys(requested))
    else:
        only = [s for s in cand["rows"] if s not in base["rows"]]
        if only:
            notes.append(f"only in the candidate run, not compared: {', '.join(only)}")
        for subset, scorer in base["unscored"].items():
            notes.append(f"{subset}: scorer {scorer!r} not available for the baseline run, not compared")
        wanted = list(base["scores"])
    subsets = []
    for subset in wanted:
        if subset not in cand["rows"]:
            failures.append(GateFailure(subset, "subset", "the baseline answered this subset, the candidate did not"))
        elif subset in cand["unscored"]:
            failures.append(GateFailure(subset, "subset", f"the baseline is scored but the candidate cannot be "
                                                          f"(scorer {cand['unscored'][subset]!r})"))
        else:
            subsets.append(subset)
    if not subsets and not failures:
        raise CheckError("no subset is scored in both runs: nothing to compare")
    return subsets


def check(config: CheckConfig) -> CheckReport:
    """The gate as a library call: :func:`compare_runs` with a :class:`CheckConfig`."""
    noise = tuple(config.noise_from)
    if noise and len(noise) != 2:
        raise CheckError(f"--noise-from takes two run directories (RUN1,RUN2), got {len(noise)}: {', '.join(noise)}")
    return compare_runs(config.baseline, config.candidate, max_drop=config.max_drop, alpha=config.alpha,
                        subsets=config.subsets or None, max_error_rate=config.max_error_rate,
                        noise_from=(Path(noise[0]), Path(noise[1])) if noise else None)


def repeat_noise(first: Path, second: Path, *, alpha: float, subsets: Sequence[str] | None) -> dict[tuple[str, str], float]:
    """``{(subset, arm or gap): points}``: how far two repeat runs of one model can disagree, the largest |bound| of
    the CI of ``second - first`` (lm-eval issue #1883: set the threshold from measured run-to-run noise)."""
    report = compare_runs(first, second, max_drop=0.0, alpha=alpha, subsets=subsets, gate=False)
    return {(c.subset, c.quantity): max(abs(c.ci_low), abs(c.ci_high)) for c in report.comparisons
            if math.isfinite(c.ci_low) and math.isfinite(c.ci_high)}


def compare_runs(baseline: Path, candidate: Path, *, max_drop: float = 1.0, alpha: float = 0.05,
                 subsets: Sequence[str] | None = None, max_error_rate: float = DEFAULT_MAX_ERROR_RATE,
                 noise_from: tuple[Path, Path] | None = None, gate: bool = True) -> CheckReport:
    """Compare two gap runs per subset, per arm and per gap, paired over item ids, and apply the gate.

    ``max_drop`` is in points on a 0-100 scale (:data:`POINTS_SCALE`); the CI level is ``1 - alpha``; the bootstrap
    uses the baseline manifest's seed and resample count. Gate failures (:class:`GateFailure`): a subset or arm of the
    baseline the candidate lacks, different items, an unusable-answer rate above the baseline's by more than
    ``max_error_rate`` points, a candidate that did not hear its audio. ``gate=False`` compares only (before/after
    reports, repeat-run noise). :class:`CheckError` for unusable input.
    """
    if max_drop < 0:
        raise CheckError(f"--max-drop must be >= 0, got {max_drop}")
    if not 0.0 < alpha < 1.0:
        raise CheckError(f"--alpha must be in (0, 1), got {alpha}")
    if max_error_rate < 0:
        raise CheckError(f"--max-error-rate must be >= 0, got {max_error_rate}")
    base, cand = load_run_scores(baseline), load_run_scores(candidate)
    notes: list[str] = []
    failures: list[GateFailure] = []
    manifest = base["manifest"]
    noise = repeat_noise(*noise_from, alpha=alpha, subsets=subsets) if noise_from else {}
    settings = {"max_drop": max_drop, "alpha": alpha, "seed": int(manifest.get("seed", 0)), "noise": noise,
                "n_resamples": int(manifest.get("statistics", {}).get("n_resamples", 10_000))}
    comparisons: list[Comparison] = []
    coverage: list[dict[str, Any]] = []
    for subset in _select_subsets(base, cand, subsets, notes, failures):
        difference = item_set_difference(subset, base["rows"][subset], cand["rows"][subset])
        if difference is not None:
            failures.append(GateFailure(subset, "items", difference))
            continue
        base_scorer, cand_scorer = base["rows"][subset][0].scorer, cand["rows"][subset][0].scorer
        if base_scorer != cand_scorer:
            failures.append(GateFailure(subset, "scorer", f"scored by {base_scorer!r} in the baseline but "
                                                          f"{cand_scorer!r} in the candidate"))
            continue
        scorer = get_scorer(base_scorer)
        if scorer.scale != 100.0 and scorer.name not in POINTS_SCALE:
            notes.append(f"{subset}: {scorer.primary} has no known 0-100 scale; compared in its own units")
        coverage += coverage_rows(subset, base, cand, max_error_rate, failures)
        comparisons += compare_subset(subset, base, cand, points_scale(scorer), settings, notes, failures)
    if gate:
        failures += front_end_gate(Path(candidate), Path(baseline), notes)
    warnings = detectability_warnings(comparisons, alpha) if gate else []
    if not gate:
        notes += [f.line() for f in failures]
        failures = []
    models = {"baseline": _model_ids(manifest), "candidate": _model_ids(cand["manifest"])}
    return CheckReport(baseline=str(baseline), candidate=str(candidate), max_drop=max_drop, alpha=alpha,
                       comparisons=comparisons, notes=notes, models=models, failures=failures, warnings=warnings,
                       max_error_rate=max_error_rate, coverage=coverage,
                       noise_from=tuple(str(p) for p in noise_from) if noise_from else ())


def front_end_gate(candidate: Path, baseline: Path, notes: list[str]) -> list[GateFailure]:
    """A gate failure per subset whose audio the candidate did not hear (:mod:`speechlm_eval.report.frontend`)."""
    from speechlm_eval.report.frontend import front_end_failures

    base = front_end_failures(RunDir(baseline))
    out = []
    for subset, reasons in front_end_failures(RunDir(candidate)).items():
        also = " (the baseline too)" if subset in base else ""
        out.append(GateFailure(subset, "front end", f"the candidate did not hear its audio{also}: "
                                                    + "; ".join(reasons)))
    return out


def detectability_warnings(comparisons: Sequence[Comparison], alpha: float) -> list[str]:
    """One warning per subset whose n cannot detect a worsening of the tolerated size: a regression of
    ``--max-drop`` points would pass there unnoticed."""
    worst: dict[str, Comparison] = {}
    for c in comparisons:
        if math.isfinite(c.mde) and c.mde > c.threshold and (c.subset not in worst or c.mde > worst[c.subset].mde):
            worst[c.subset] = c
    return [f"{c.subset}: at n={c.n} the smallest worsening detectable with {POWER:.0%} power at alpha "
            f"{alpha:g} is {c.mde:.1f} points ({c.quantity}), above the threshold {c.threshold:g}: a regression "
            "of the threshold's size would pass unnoticed; use more items or a larger --max-drop"
            for c in worst.values()]


# ---------------------------------------------------------------------------------------------------- output


def _row(c: Comparison) -> str:
    verdict = "**FAIL**" if c.verdict == "FAIL" else c.verdict
    return (f"| {c.subset} | {c.quantity} | {c.n} | {c.baseline:.2f} | {c.candidate:.2f} | {c.delta:+.2f} | "
            f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}] | {c.p_value:.3g} | {c.mde:.1f} | {c.threshold:g} | "
            f"{verdict} ({c.reason}) |")


def _status(report: CheckReport) -> str:
    n_fail = sum(c.verdict == "FAIL" for c in report.comparisons)
    if not report.failed:
        return "pass"
    parts = []
    if report.failures:
        parts.append(f"{len(report.failures)} gate failure{'s' if len(report.failures) != 1 else ''}")
    if n_fail:
        parts.append(f"{n_fail} regression{'s' if n_fail != 1 else ''}")
    return f"FAIL ({', '.join(parts)})"


def _coverage_lines(report: CheckReport) -> list[str]:
    rows = [r for r in report.coverage if r["baseline"] or r["candidate"] is None or r["candidate"]]
    if not rows:
        return []
    lines = ["", "Unusable answers (error, missing, unparsed or unscored), % of items:", "",
             "| subset | arm | baseline | candidate |", "|---|---|---|---|"]
    for r in rows:
        cand = "arm missing" if r["candidate"] is None else f"{r['candidate']:.1f}"
        lines.append(f"| {r['subset']} | {r['arm']} | {r['baseline']:.1f} | {cand} |")
    return lines


def render_check_markdown(report: CheckReport) -> str:
    """The gate's Markdown: verdict, gate failures, detectability warnings, settings, one table row per comparison,
    notes."""
    level = round(100 * (1 - report.alpha), 4)
    lines = [f"## speechlm-eval check: {_status(report)}", ""]
    if report.failures:
        lines += ["Gate failures (the candidate cannot pass, whatever its scores):", ""]
        lines += [f"- **{f.subset} · {f.what}**: {f.reason}" for f in report.failures] + [""]
    if report.warnings:
        lines += ["Warnings:", ""] + [f"- {w}" for w in report.warnings] + [""]
    noise = (f" Thresholds are raised to the repeat-run noise of {' vs '.join(report.noise_from)} where it is larger."
             if report.noise_from else "")
    lines += [
        f"Baseline `{report.baseline}` ({report.models.get('baseline') or 'models not recorded'}) vs candidate "
        f"`{report.candidate}` ({report.models.get('candidate') or 'models not recorded'}).", "",
        f"FAIL when a score drops, or a gap (forgetting, inequivalence) grows, by more than its threshold (--max-drop "
        f"{report.max_drop:g} point(s)) AND the two-sided paired test gives p < {report.alpha:g}; and whenever the "
        "candidate lacks a subset or arm of the baseline, answered different items, has more than "
        f"{report.max_error_rate:g} points more unusable answers, or did not hear its audio. Points are on a 0-100 "
        "scale (accuracies in %, refusal_rate x100, open-ended 1-5 judge means x20). delta = candidate - baseline over "
        f"the items scored in both runs, with a {level:g}% paired-bootstrap CI. MDE: the smallest worsening this n "
        f"detects with {POWER:.0%} power.{noise}", "",
        "| subset | arm/gap | n | baseline | candidate | delta | CI | p | MDE | threshold | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(c) for c in report.comparisons]
    lines += _coverage_lines(report)
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def render_check_error(baseline: Any, candidate: Any, message: str) -> str:
    """The step summary of a check that could not compare the runs (exit 2), so CI shows why."""
    return (f"## speechlm-eval check: error (exit 2)\n\nBaseline `{baseline}` vs candidate `{candidate}`: the runs "
            f"could not be compared.\n\n{message}\n")


def append_step_summary(markdown: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY`` (the job summary of GitHub Actions) when it is set."""
    target = (os.environ if env is None else env).get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(markdown + "\n")
    return path
