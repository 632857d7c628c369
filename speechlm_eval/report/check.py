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
    """Runs that cannot be compared: a missing run or file, a run without records, different item sets."""


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
    subsets: list[str] = field(default_factory=list, metadata={
        "help": "Compare only these subsets (repeatable; default: every subset scored in both runs).",
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


@dataclass(frozen=True)
class CheckReport:
    """Every comparison of two runs, the gate's settings and notes on what was not compared."""

    baseline: str
    candidate: str
    max_drop: float
    alpha: float
    comparisons: list[Comparison]
    notes: list[str] = field(default_factory=list)
    models: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(c.verdict == "FAIL" for c in self.comparisons)


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


def check_same_items(subset: str, baseline_rows: list[ItemRow], candidate_rows: list[ItemRow]) -> None:
    """:class:`CheckError` naming the differing ids when the two runs did not answer the same items of ``subset``
    (different ids, or the same ids with a different question or reference)."""
    base_ids = {r.id for r in baseline_rows}
    cand_ids = {r.id for r in candidate_rows}
    parts = []
    if base_ids - cand_ids:
        parts.append(f"only in baseline {_ids_listing(list(base_ids - cand_ids))}")
    if cand_ids - base_ids:
        parts.append(f"only in candidate {_ids_listing(list(cand_ids - base_ids))}")
    if parts:
        raise CheckError(f"subset {subset}: the runs have different item sets ({'; '.join(parts)})")
    # Same ids can still be different questions (e.g. VoiceBench's bbh was re-uploaded): compare what was asked.
    base_content = {r.id: _content(r) for r in baseline_rows}
    changed = [r.id for r in candidate_rows if _content(r) != base_content[r.id]]
    if changed:
        raise CheckError(f"subset {subset}: items with the same id differ in text, choices or reference between the "
                         f"runs (different data revisions?): {_ids_listing(changed)}")


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
        return "pass", f"{worse} within --max-drop", worse_by
    return "pass", "no regression", worse_by


def _mean_points(values: np.ndarray, scale: float) -> float:
    return scale * float(values.mean())


def _comparison(subset: str, quantity: str, kind: Literal["arm", "gap"], base: np.ndarray, cand: np.ndarray,
                scale: float, settings: Mapping[str, Any]) -> Comparison:
    """Compare aligned per-item values (arm scores or per-item gap contributions, n >= 1) of the two runs."""
    estimate: GapEstimate = paired_gap(cand, base, scale=scale, n_resamples=settings["n_resamples"],
                                       confidence=1.0 - settings["alpha"], seed=settings["seed"])
    delta, p_value = estimate.value, estimate.p_value
    verdict, reason, worse_by = judge(kind, delta, p_value, settings["max_drop"], settings["alpha"])
    return Comparison(subset=subset, quantity=quantity, kind=kind, n=estimate.n, baseline=_mean_points(base, scale),
                      candidate=_mean_points(cand, scale), delta=delta, ci_low=estimate.ci_low,
                      ci_high=estimate.ci_high, p_value=p_value, test=estimate.test, worse_by=worse_by,
                      verdict=verdict, reason=reason)


def _present_arms(run: Mapping[str, Any], subset: str) -> set[str]:
    """Arms with at least one record (errored or not) for ``subset`` in a run."""
    return {arm for arm, n in run["recorded"][subset].items() if n > 0}


def _pair_or_fail(subset: str, label: str, maps: Sequence[Mapping[str, Any]], ids: Sequence[str],
                  notes: list[str]) -> list[np.ndarray]:
    """Aligned values over the ids scored everywhere; a note for items left out, CheckError when none is left."""
    kept, values = _paired_values(maps, ids)
    if not kept:
        raise CheckError(f"subset {subset}, {label}: no item is scored in both runs (every record is missing or an "
                         "error in at least one run)")
    if len(kept) < len(ids):
        notes.append(f"{subset} · {label}: {len(ids) - len(kept)} of {len(ids)} items unscored (error or no record) "
                     "in a run, left out of the pairing")
    return values


def compare_subset(subset: str, base: Mapping[str, Any], cand: Mapping[str, Any], scale: float,
                   settings: Mapping[str, Any], notes: list[str]) -> list[Comparison]:
    """Every arm with records in both runs, then every gap whose two arms have records in both runs."""
    ids = [r.id for r in base["rows"][subset]]
    base_scores, cand_scores = base["scores"][subset], cand["scores"][subset]
    present = _present_arms(base, subset) & _present_arms(cand, subset)
    for arm in sorted(_present_arms(base, subset) ^ _present_arms(cand, subset)):
        notes.append(f"{subset} · {arm}: answered in only one run, not compared")
    out = []
    for arm in (a for a in ARMS if a in present):
        base_values, cand_values = _pair_or_fail(subset, arm, [base_scores[arm], cand_scores[arm]], ids, notes)
        out.append(_comparison(subset, arm, "arm", base_values, cand_values, scale, settings))
    for gap, (first, second) in GAPS.items():
        if first in present and second in present:
            maps = [base_scores[first], base_scores[second], cand_scores[first], cand_scores[second]]
            b1, b2, c1, c2 = _pair_or_fail(subset, gap, maps, ids, notes)
            # A gap is the mean of per-item contributions first - second, so its change pairs those contributions.
            out.append(_comparison(subset, gap, "gap", b1 - b2, c1 - c2, scale, settings))
    return out


# ---------------------------------------------------------------------------------------------------- the gate


def _select_subsets(base: Mapping[str, Any], cand: Mapping[str, Any], requested: Sequence[str] | None,
                    notes: list[str]) -> list[str]:
    if requested:
        for subset in requested:
            for name, run in (("baseline", base), ("candidate", cand)):
                if subset not in run["rows"]:
                    raise CheckError(f"subset {subset!r} is not in the {name} run (it has: {', '.join(run['rows'])})")
                if subset in run["unscored"]:
                    raise CheckError(f"subset {subset!r}: scorer {run['unscored'][subset]!r} is not available, "
                                     f"so the {name} run cannot be scored")
        return list(dict.fromkeys(requested))
    for name, run, other in (("baseline", base, cand), ("candidate", cand, base)):
        only = [s for s in run["rows"] if s not in other["rows"]]
        if only:
            notes.append(f"only in the {name} run, not compared: {', '.join(only)}")
        for subset, scorer in run["unscored"].items():
            notes.append(f"{subset}: scorer {scorer!r} not available for the {name} run, not compared")
    subsets = [s for s in base["scores"] if s in cand["scores"]]
    if not subsets:
        raise CheckError("no subset is scored in both runs: nothing to compare")
    return subsets


def check(config: CheckConfig) -> CheckReport:
    """The gate as a library call: :func:`compare_runs` with a :class:`CheckConfig`."""
    return compare_runs(config.baseline, config.candidate, max_drop=config.max_drop, alpha=config.alpha,
                        subsets=config.subsets or None)


def compare_runs(baseline: Path, candidate: Path, *, max_drop: float = 1.0, alpha: float = 0.05,
                 subsets: Sequence[str] | None = None) -> CheckReport:
    """Compare two gap runs per subset, per arm and per gap, paired over item ids.

    ``max_drop`` is in points on a 0-100 scale (:data:`POINTS_SCALE`); the CI level is ``1 - alpha``; the bootstrap
    uses the baseline manifest's seed and resample count. :class:`CheckError` for unusable input.
    """
    if max_drop < 0:
        raise CheckError(f"--max-drop must be >= 0, got {max_drop}")
    if not 0.0 < alpha < 1.0:
        raise CheckError(f"--alpha must be in (0, 1), got {alpha}")
    base, cand = load_run_scores(baseline), load_run_scores(candidate)
    notes: list[str] = []
    manifest = base["manifest"]
    settings = {"max_drop": max_drop, "alpha": alpha, "seed": int(manifest.get("seed", 0)),
                "n_resamples": int(manifest.get("statistics", {}).get("n_resamples", 10_000))}
    comparisons: list[Comparison] = []
    for subset in _select_subsets(base, cand, subsets, notes):
        check_same_items(subset, base["rows"][subset], cand["rows"][subset])
        base_scorer, cand_scorer = base["rows"][subset][0].scorer, cand["rows"][subset][0].scorer
        if base_scorer != cand_scorer:
            raise CheckError(f"subset {subset}: scored by {base_scorer!r} in the baseline but {cand_scorer!r} in the "
                             "candidate")
        scorer = get_scorer(base_scorer)
        if scorer.scale != 100.0 and scorer.name not in POINTS_SCALE:
            notes.append(f"{subset}: {scorer.primary} has no known 0-100 scale; compared in its own units")
        comparisons += compare_subset(subset, base, cand, points_scale(scorer), settings, notes)
    models = {"baseline": _model_ids(manifest), "candidate": _model_ids(cand["manifest"])}
    return CheckReport(baseline=str(baseline), candidate=str(candidate), max_drop=max_drop, alpha=alpha,
                       comparisons=comparisons, notes=notes, models=models)


# ---------------------------------------------------------------------------------------------------- output


def _row(c: Comparison) -> str:
    verdict = "**FAIL**" if c.verdict == "FAIL" else c.verdict
    return (f"| {c.subset} | {c.quantity} | {c.n} | {c.baseline:.2f} | {c.candidate:.2f} | {c.delta:+.2f} | "
            f"[{c.ci_low:+.2f}, {c.ci_high:+.2f}] | {c.p_value:.3g} | {verdict} ({c.reason}) |")


def render_check_markdown(report: CheckReport) -> str:
    """The gate's Markdown: verdict, settings, one table row per comparison, notes."""
    n_fail = sum(c.verdict == "FAIL" for c in report.comparisons)
    status = f"FAIL ({n_fail} regression{'s' if n_fail != 1 else ''})" if report.failed else "pass"
    level = round(100 * (1 - report.alpha), 4)
    lines = [
        f"## speechlm-eval check: {status}", "",
        f"Baseline `{report.baseline}` ({report.models.get('baseline') or 'models not recorded'}) vs candidate "
        f"`{report.candidate}` ({report.models.get('candidate') or 'models not recorded'}).", "",
        f"FAIL when a score drops, or a gap (forgetting, inequivalence) grows, by more than {report.max_drop:g} "
        f"point(s) AND the two-sided paired test gives p < {report.alpha:g}. Points are on a 0-100 scale "
        "(accuracies in %, refusal_rate x100, open-ended 1-5 judge means x20). delta = candidate - baseline over the "
        f"items scored in both runs, with a {level:g}% paired-bootstrap CI.", "",
        "| subset | arm/gap | n | baseline | candidate | delta | CI | p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(c) for c in report.comparisons]
    if report.notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines) + "\n"


def append_step_summary(markdown: str, env: Mapping[str, str] | None = None) -> Path | None:
    """Append ``markdown`` to ``$GITHUB_STEP_SUMMARY`` (the job summary of GitHub Actions) when it is set."""
    target = (os.environ if env is None else env).get("GITHUB_STEP_SUMMARY")
    if not target:
        return None
    path = Path(target)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(markdown + "\n")
    return path
