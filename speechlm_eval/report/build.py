"""Results and reports rebuilt from a run directory alone (manifest + items + records): no model, no torch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from speechlm_eval.metrics.paired import mean_ci, paired_gap
from speechlm_eval.records import ARMS, read_records, write_json_atomic, write_text_atomic
from speechlm_eval.metrics.overall import leaderboard_overall
from speechlm_eval.report.diagnostics import diagnostics_results
from speechlm_eval.scoring import load_builtin_scorers
from speechlm_eval.scoring.base import item_rng
from speechlm_eval.scoring.judge import JUDGE_NONE_NOTE, JUDGED_SCORERS, MissingJudgement, attach_judgements
from speechlm_eval.scoring.registry import Scorer, get_scorer

RESULTS_SCHEMA = "speechlm-eval/results/v1"
GAPS = {"forgetting": ("text_llm_text", "speech_llm_text"), "inequivalence": ("speech_llm_text", "speech_llm_speech")}


def load_run(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, dict[str, Any]]]]:
    """The manifest, the item rows and ``{arm: {item id: record}}`` of a run directory.

    Judge outputs (``judgements/<arm>.jsonl``, for the judge-scored subsets) are folded into the item rows as
    ``row["judgements"]``: a list of judgement rows keyed by the judged response's hash.
    """
    manifest = json.loads((run_dir / "manifest.json").read_text())
    items = read_records(run_dir / "items.jsonl")
    records = {}
    for arm in ARMS:
        path = run_dir / "records" / f"{arm}.jsonl"
        if path.exists():
            records[arm] = {r["id"]: r for r in read_records(path)}
    judgements: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((run_dir / "judgements").glob("*.jsonl")):
        for row in read_records(path):
            judgements.setdefault(row["id"], []).append(row)
    if judgements:
        items = [{**row, "judgements": judgements.get(row["id"], [])} for row in items]
    return manifest, items, records


def as_item(row: dict[str, Any]) -> SimpleNamespace:
    """A scorer-facing view of an ``items.jsonl`` row (the same attribute names as ``Item``, plus judgements)."""
    item = SimpleNamespace(
        id=row["id"], subset=row["subset"], text=row["text"], audio_instruction=row["audio_instruction"],
        choices=tuple(row["choices"]), reference=row["reference"], meta=row["meta"],
    )
    if row["scorer"] in JUDGED_SCORERS:
        item = attach_judgements(item, row.get("judgements", []))
    return item


def score_arm(scorer: Scorer, items: list[SimpleNamespace], records: dict[str, dict[str, Any]], arm: str,
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


def subset_results(rows: list[dict[str, Any]], records: dict[str, dict[str, dict[str, Any]]], seed: int,
                   n_resamples: int, per_arm: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Arm scores (with bootstrap CIs), official metric dicts and the two paired gaps of one subset.

    ``per_arm``: the subset's per-item scores when already computed (:func:`subset_item_scores`).
    """
    items = [as_item(r) for r in rows]
    scorer = get_scorer(rows[0]["scorer"])
    entry: dict[str, Any] = {"n": len(items), "scorer": scorer.name, "metric": scorer.primary,
                             "speech_only": is_speech_only(rows), "arms": {}}
    if per_arm is None:
        per_arm = subset_item_scores(rows, records, seed)
    for arm, scores in per_arm.items():
        arm_records = records[arm]
        valid = [(it, s) for it, s in zip(items, scores.values()) if s is not None]
        values = np.array([s.value for _, s in valid], dtype=float)
        recorded_ok = sum(1 for it in items if it.id in arm_records and arm_records[it.id].get("error") is None)
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
        entry["arms"][arm] = arm_entry
    for gap, (first, second) in GAPS.items():
        if first in per_arm and second in per_arm:
            both = [i.id for i in items if per_arm[first][i.id] is not None and per_arm[second][i.id] is not None]
            a = np.array([per_arm[first][i].value for i in both], dtype=float)
            b = np.array([per_arm[second][i].value for i in both], dtype=float)
            entry[gap] = paired_gap(a, b, scale=scorer.scale, n_resamples=n_resamples, seed=seed).to_dict()
    return entry


def is_speech_only(rows: list[dict[str, Any]]) -> bool:
    """True when no item of a subset can be asked as text, so only the speech arm applies (as ``subset_results``)."""
    return not any(r["text"] is not None and r["audio_instruction"] is None for r in rows)


def subset_item_scores(rows: list[dict[str, Any]], records: dict[str, dict[str, dict[str, Any]]],
                       seed: int) -> dict[str, dict[str, Any]]:
    """``{arm: {item id: Score | None}}`` of one subset: the per-item scores ``subset_results`` aggregates."""
    items = [as_item(r) for r in rows]
    scorer = get_scorer(rows[0]["scorer"])
    speech_only = is_speech_only(rows)
    return {arm: score_arm(scorer, items, arm_records, arm, seed) for arm, arm_records in records.items()
            if not (speech_only and arm != "speech_llm_speech")}


def run_item_scores(run_dir: Path) -> dict[str, Any]:
    """Per-item scores of a run, as ``build_results`` computes them, for comparisons across runs (``check``).

    Returns ``{"manifest", "rows": {subset: [item rows]}, "scores": {subset: {arm: {id: Score | None}}},
    "recorded": {subset: {arm: items with a record, errors included}}, "unscored": {subset: scorer name}}``; subsets
    whose scorer is not registered are listed under ``unscored``.
    """
    load_builtin_scorers()
    manifest, rows, records = load_run(Path(run_dir))
    seed = int(manifest.get("seed", 0))
    by_subset: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_subset.setdefault(row["subset"], []).append(row)
    scores, recorded, unscored = {}, {}, {}
    for subset, subset_rows in by_subset.items():
        if unscored_reason(subset_rows) is not None:
            unscored[subset] = subset_rows[0]["scorer"]
            continue
        scores[subset] = subset_item_scores(subset_rows, records, seed)
        recorded[subset] = {arm: sum(r["id"] in records[arm] for r in subset_rows) for arm in scores[subset]}
    return {"manifest": manifest, "rows": by_subset, "scores": scores, "recorded": recorded, "unscored": unscored}


def unscored_reason(rows: list[dict[str, Any]]) -> str | None:
    """Why a subset cannot be scored at all (``None`` when it can)."""
    name = rows[0]["scorer"]
    try:
        get_scorer(name)
    except KeyError:
        return f"scorer {name!r} is not available in this version; responses are in the records"
    if name in JUDGED_SCORERS and not any(r.get("judgements") for r in rows):
        return JUDGE_NONE_NOTE
    return None


def build_results(run_dir: Path) -> dict[str, Any]:
    """The ``results.json`` object of a run, computed from its files only."""
    load_builtin_scorers()
    manifest, rows, records = load_run(run_dir)
    seed = int(manifest.get("seed", 0))
    n_resamples = int(manifest.get("statistics", {}).get("n_resamples", 10_000))
    by_subset: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_subset.setdefault(row["subset"], []).append(row)
    subsets, unscored, item_scores, scales = {}, {}, {}, {}
    for subset, subset_rows in by_subset.items():
        reason = unscored_reason(subset_rows)
        if reason is not None:
            unscored[subset] = {"n": len(subset_rows), "scorer": subset_rows[0]["scorer"], "reason": reason}
            continue
        item_scores[subset] = subset_item_scores(subset_rows, records, seed)
        scales[subset] = get_scorer(subset_rows[0]["scorer"]).scale
        subsets[subset] = subset_results(subset_rows, records, seed, n_resamples, item_scores[subset])
    if (Path(run_dir) / "lmeval").is_dir():
        from speechlm_eval.lmeval.run import lmeval_results_fragment

        subsets.update(lmeval_results_fragment(Path(run_dir), seed=seed, n_resamples=n_resamples))
    results = {"schema": RESULTS_SCHEMA, "subsets": subsets, "unscored": unscored}
    results["overall"] = leaderboard_overall(subsets)
    results["diagnostics"] = diagnostics_results(Path(run_dir), item_scores, scales, seed, n_resamples)
    results["manifest"] = manifest
    return results


def build_report(run_dir: Path) -> dict[str, Any]:
    """Write ``results.json``, ``report.md``, ``report.html`` and ``plots/*.png`` for a run directory; returns the
    results."""
    from speechlm_eval.report.html import write_html
    from speechlm_eval.report.markdown import render_markdown
    from speechlm_eval.report.plots import report_figures, write_plots

    run_dir = Path(run_dir)
    results = build_results(run_dir)
    figures = report_figures(results)
    write_json_atomic(run_dir / "results.json", results)
    plots = write_plots(run_dir, figures)
    write_text_atomic(run_dir / "report.md", render_markdown(results, plots))
    write_html(run_dir, results, figures)
    return results
