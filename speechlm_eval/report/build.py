"""Results and reports rebuilt from a run directory alone (manifest + items + records): no model, no torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from speechlm_eval.metrics.overall import leaderboard_overall
from speechlm_eval.metrics.paired import mean_ci, paired_gap
from speechlm_eval.records import json_safe, write_json_atomic, write_text_atomic
from speechlm_eval.report.diagnostics import diagnostics_results
from speechlm_eval.report.frontend import front_end_results
from speechlm_eval.report.served import parity_results, usage_results
from speechlm_eval.rundir import GAPS, SPEECH_ARM, ItemRow, RunDir
from speechlm_eval.scoring.base import item_rng
from speechlm_eval.scoring.judged import JUDGE_NONE_NOTE, MissingJudgement
from speechlm_eval.scoring.registry import SCORERS, Scorer, get_scorer

RESULTS_SCHEMA = "speechlm-eval/results/v1"


@dataclass
class ReportConfig:
    """``speechlm-eval report``: which run to rebuild, optionally judging it first."""

    run_dir: Path = field(metadata={"argument": True, "help": "A gap run directory."})
    judge: str | None = field(default=None, metadata={
        "help": "Judge the open-ended/sd-qa responses first (see gap --judge)."})


def rebuild_report(config: ReportConfig) -> Path:
    """Rebuild results.json, report.md and report.html from a run's records alone (judging first with ``judge``);
    returns the path of report.md. :class:`RunFailedError` (after writing) when an arm has nothing scored."""
    run = RunDir(config.run_dir)
    if not run.manifest_path.exists():
        raise FileNotFoundError(f"{config.run_dir} is not a run directory (no manifest.json)")
    if not run.arm_records():
        raise FileNotFoundError(f"{config.run_dir} has no records (records/<arm>.jsonl): nothing to report")
    if config.judge is not None:
        from speechlm_eval.judge.run import judge_run

        judge_run(run.path, config.judge)
    check_run_succeeded(run.path, build_report(run.path))
    return run.path / "report.md"
Records = Mapping[str, Mapping[str, dict[str, Any]]]  # {arm: {item id: record}}


def score_arm(scorer: Scorer, items: list[ItemRow], records: Mapping[str, dict[str, Any]], arm: str,
              seed: int) -> dict[str, Any]:
    """Per-item scores of one arm (``None`` where the record is missing or an error)."""
    scores = {}
    for item in items:
        record = records.get(item.id)
        if record is None or record.get("error") is not None:
            scores[item.id] = None
            continue
        try:
            score = scorer.score(item, record["response"], item_rng(seed, item.id, arm))
        except MissingJudgement:
            score = None  # judge-scored subset whose response was not judged (yet)
        scores[item.id] = score if score is not None and math.isfinite(score.value) else None
    return scores


def subset_results(items: list[ItemRow], records: Records, seed: int, n_resamples: int,
                   per_arm: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Arm scores (with bootstrap CIs), official metric dicts and the two paired gaps of one subset.

    ``per_arm``: the subset's per-item scores when already computed (:func:`subset_item_scores`).
    """
    scorer = get_scorer(items[0].scorer)
    entry: dict[str, Any] = {"n": len(items), "scorer": scorer.name, "metric": scorer.primary,
                             "speech_only": is_speech_only(items), "arms": {}}
    if per_arm is None:
        per_arm = subset_item_scores(items, records, seed)
    for arm, scores in per_arm.items():
        arm_records = records[arm]
        valid = [(it, s) for it, s in zip(items, scores.values()) if s is not None]
        values = np.array([s.value for _, s in valid], dtype=float)
        recorded_ok = sum(1 for it in items if it.id in arm_records and arm_records[it.id].get("error") is None)
        first_error = next((arm_records[it.id]["error"] for it in items
                            if arm_records.get(it.id, {}).get("error") is not None), None)
        arm_entry: dict[str, Any] = {
            "n": len(valid),
            "errors": sum(1 for it in items if arm_records.get(it.id, {}).get("error") is not None),
            "missing": sum(1 for it in items if it.id not in arm_records),
            "not_scored": recorded_ok - len(valid),  # e.g. judge-scored responses without judge outputs
        }
        if valid:
            value, low, high = mean_ci(values, scale=scorer.scale, n_resamples=n_resamples, seed=seed)
            arm_entry.update(score=value, ci_low=low, ci_high=high,
                             unparsed=sum(not s.parsed for _, s in valid),
                             official=scorer.aggregate([it for it, _ in valid], [s for _, s in valid]))
        else:
            arm_entry.update(score=None, ci_low=None, ci_high=None, unparsed=0, official=None)
            if first_error is not None:  # why nothing could be scored, for the error a failed run ends with
                arm_entry["first_error"] = (first_error.get("message") if isinstance(first_error, Mapping)
                                            else str(first_error))
        entry["arms"][arm] = arm_entry
    for gap, (first, second) in GAPS.items():
        if first in per_arm and second in per_arm:
            both = [i.id for i in items if per_arm[first][i.id] is not None and per_arm[second][i.id] is not None]
            a = np.array([per_arm[first][i].value for i in both], dtype=float)
            b = np.array([per_arm[second][i].value for i in both], dtype=float)
            entry[gap] = paired_gap(a, b, scale=scorer.scale, n_resamples=n_resamples, seed=seed).to_dict()
    return entry


def is_speech_only(items: list[ItemRow]) -> bool:
    """True when no item of a subset can be asked as text, so only the speech arm applies (as ``subset_results``)."""
    return not any(item.has_text_equivalent for item in items)


def subset_item_scores(items: list[ItemRow], records: Records, seed: int) -> dict[str, dict[str, Any]]:
    """``{arm: {item id: Score | None}}`` of one subset: the per-item scores ``subset_results`` aggregates."""
    scorer = get_scorer(items[0].scorer)
    speech_only = is_speech_only(items)
    return {arm: score_arm(scorer, items, arm_records, arm, seed) for arm, arm_records in records.items()
            if not (speech_only and arm != SPEECH_ARM)}


def by_subset(items: list[ItemRow]) -> dict[str, list[ItemRow]]:
    """The items of each subset, subsets in first-appearance order."""
    out: dict[str, list[ItemRow]] = {}
    for item in items:
        out.setdefault(item.subset, []).append(item)
    return out


def run_item_scores(run_dir: Path) -> dict[str, Any]:
    """Per-item scores of a run, as ``build_results`` computes them, for comparisons across runs (``check``).

    Returns ``{"manifest", "rows": {subset: [ItemRow]}, "scores": {subset: {arm: {id: Score | None}}},
    "recorded": {subset: {arm: items with a record, errors included}}, "unscored": {subset: scorer name},
    "records": {arm: {id: record}}}``; subsets whose scorer is not registered are listed under ``unscored``.
    """
    run = RunDir(run_dir)
    manifest, records = run.read_manifest(), run.arm_records()
    grouped = by_subset(run.items())
    scores, recorded, unscored = {}, {}, {}
    for subset, items in grouped.items():
        if unscored_reason(items) is not None:
            unscored[subset] = items[0].scorer
            continue
        scores[subset] = subset_item_scores(items, records, manifest.seed)
        recorded[subset] = {arm: sum(i.id in records[arm] for i in items) for arm in scores[subset]}
    return {"manifest": manifest.to_dict(), "rows": grouped, "scores": scores, "recorded": recorded,
            "unscored": unscored, "records": records}


def unscored_reason(items: list[ItemRow]) -> str | None:
    """Why a subset cannot be scored at all (``None`` when it can)."""
    name = items[0].scorer
    if name not in SCORERS:
        return f"scorer {name!r} is not available in this version; responses are in the records"
    if get_scorer(name).judged and not any(i.judgements for i in items):
        return JUDGE_NONE_NOTE
    return None


def _score_json(score: Any) -> dict[str, Any]:
    return {"score": json_safe(score.value), "parsed": bool(score.parsed), "extracted": json_safe(score.extracted)}


def item_score_rows(grouped: Mapping[str, list[ItemRow]], records: Records,
                    item_scores: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per item for ``scores.jsonl``: what was asked, the reference, and per arm the response with its score,
    parsed flag and extracted answer; ``gaps`` holds the item's contribution to each gap (first arm − second arm,
    ``None`` unless both are scored), so ``gaps.inequivalence > 0`` lists the items answered better typed than spoken
    and ``gaps.forgetting > 0`` the items the text LLM answered better than the speech LLM."""
    rows = []
    for subset, items in grouped.items():
        per_arm = item_scores.get(subset, {})
        for item in items:
            arms: dict[str, Any] = {}
            for arm, arm_records in records.items():
                record = arm_records.get(item.id)
                if record is None:
                    continue
                error = record.get("error")
                entry: dict[str, Any] = {"response": record.get("response"),
                                         "error": None if error is None else str(error.get("message", error))
                                         if isinstance(error, Mapping) else str(error)}
                score = per_arm.get(arm, {}).get(item.id)
                entry.update(_score_json(score) if score is not None
                             else {"score": None, "parsed": None, "extracted": None})
                arms[arm] = entry
            gaps = {}
            for gap, (first, second) in GAPS.items():
                a, b = per_arm.get(first, {}).get(item.id), per_arm.get(second, {}).get(item.id)
                gaps[gap] = None if a is None or b is None else json_safe(float(a.value) - float(b.value))
            rows.append({"id": item.id, "subset": subset, "scorer": item.scorer, "text": item.text,
                         "audio_instruction": item.audio_instruction, "choices": list(item.choices),
                         "reference": json_safe(item.reference), "arms": arms, "gaps": gaps})
    return rows


def build_results(run_dir: Path) -> dict[str, Any]:
    """The ``results.json`` object of a run, computed from its files only."""
    return build_results_and_scores(run_dir)[0]


def build_results_and_scores(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``results.json`` and the ``scores.jsonl`` rows of a run (:func:`item_score_rows`), from its files only."""
    from speechlm_eval.report.lmeval import lmeval_results

    run = RunDir(run_dir)
    manifest, records = run.read_manifest(), run.arm_records()
    seed, n_resamples = manifest.seed, manifest.n_resamples
    subsets, unscored, item_scores, scales = {}, {}, {}, {}
    grouped = by_subset(run.items())
    for subset, items in grouped.items():
        reason = unscored_reason(items)
        if reason is not None:
            unscored[subset] = {"n": len(items), "scorer": items[0].scorer, "reason": reason}
            continue
        item_scores[subset] = subset_item_scores(items, records, seed)
        scales[subset] = get_scorer(items[0].scorer).scale
        subsets[subset] = subset_results(items, records, seed, n_resamples, item_scores[subset])
    if run.lmeval_dir.is_dir():
        subsets.update(lmeval_results(run, seed=seed, n_resamples=n_resamples))
    front_end = front_end_results(run)
    mark_front_end_failures(subsets, front_end)
    results = {"schema": RESULTS_SCHEMA, "subsets": subsets, "unscored": unscored, "front_end": front_end}
    results["overall"] = leaderboard_overall(subsets)
    results["diagnostics"] = diagnostics_results(run, item_scores, scales, seed, n_resamples)
    parity, usage = parity_results(run), usage_results(run)
    if parity is not None:  # only runs with served models have these; other runs' results stay as they were
        results["parity"] = parity
    if usage:
        results["usage"] = usage
    results["manifest"] = manifest.to_dict()
    return results, item_score_rows(grouped, records, item_scores)


class RunFailedError(ValueError):
    """A run whose records leave a subset's arm with no scorable item (every item an error or missing): its numbers
    would be "–", so the run is an error, not a result. Raised after the report is written, so it can be read."""

    def __init__(self, run_dir: Path, problems: list[str]) -> None:
        super().__init__(f"{run_dir}: no item could be scored in " + "; ".join(problems)
                         + f" (records and report are in {run_dir})")
        self.run_dir, self.problems = Path(run_dir), problems


def failed_arms(results: Mapping[str, Any]) -> list[str]:
    """``"subset · arm: all N items failed (...)"`` for each arm of a subset with records but nothing scored."""
    out = []
    for subset, entry in results.get("subsets", {}).items():
        for arm, a in (entry.get("arms") or {}).items():
            if not isinstance(a, Mapping) or a.get("n") or not (a.get("errors") or a.get("missing")):
                continue
            first = f"; first error: {a['first_error']}" if a.get("first_error") else ""
            out.append(f"{subset} · {arm}: all {entry.get('n')} items failed ({a.get('errors', 0)} error records, "
                       f"{a.get('missing', 0)} missing{first})")
    return out


def check_run_succeeded(run_dir: Path, results: Mapping[str, Any]) -> None:
    """:class:`RunFailedError` when :func:`failed_arms` finds an arm with nothing scored."""
    problems = failed_arms(results)
    if problems:
        raise RunFailedError(Path(run_dir), problems)


def mark_front_end_failures(subsets: dict[str, Any], front_end: Mapping[str, Mapping[str, Any]]) -> None:
    """Flag each subset whose audio was not heard, and its inequivalence: that gap measures a broken front end."""
    for subset, entry in front_end.items():
        if entry.get("failure") and subset in subsets:
            subsets[subset]["front_end_failure"] = list(entry["reasons"])
            if subsets[subset].get("inequivalence"):
                subsets[subset]["inequivalence"]["front_end_failure"] = True


def build_report(run_dir: Path) -> dict[str, Any]:
    """Write ``results.json``, ``scores.jsonl`` (per item), ``report.md``, ``report.html`` and ``plots/*.png`` for a
    run directory; returns the results."""
    from speechlm_eval.report.html import write_html
    from speechlm_eval.report.markdown import render_markdown
    from speechlm_eval.report.plots import report_figures, write_plots

    run_dir = Path(run_dir)
    results, scores = build_results_and_scores(run_dir)
    figures = report_figures(results)
    write_json_atomic(run_dir / "results.json", results)
    RunDir(run_dir).write_scores(scores)
    plots = write_plots(run_dir, figures)
    write_text_atomic(run_dir / "report.md", render_markdown(results, plots))
    write_html(run_dir, results, figures, scores)
    return results
