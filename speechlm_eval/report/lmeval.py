"""The ``lmeval:<task>`` entries of results.json, from the lm-eval records under ``lmeval/`` alone (no lm-eval, no
model): the two text arms' forgetting per task, and the spoken-vs-typed log-likelihood inequivalence."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from speechlm_eval.metrics.paired import mean_ci, paired_gap
from speechlm_eval.rundir import LMEVAL_GAPS, LMEVAL_SPOKEN_ARMS, RunDir

HARNESS_ARMS: tuple[str, str] = tuple(LMEVAL_GAPS["forgetting"])  # type: ignore[assignment]
_ARM_ORDER = {arm: i for i, arm in enumerate([*HARNESS_ARMS, *LMEVAL_SPOKEN_ARMS])}
NOTES_FILE = "notes.json"  # {task: [note]} for tasks whose spoken arms could not be run


def primary_metric(records: Sequence[dict[str, Any]]) -> str:
    """``acc`` when the documents have it, else the first numeric per-document metric lm-eval logged."""
    names = [n for r in records for n in r.get("metric_names", ["acc"])]
    numeric = [n for n in dict.fromkeys(names) if any(isinstance(r.get(n), float) for r in records)]
    return "acc" if "acc" in numeric or not numeric else numeric[0]


def lmeval_results(run: RunDir | Path, seed: int = 0, n_resamples: int = 10_000) -> dict[str, Any]:
    """``{"lmeval:<task>": entry}`` from the records under ``out_dir/lmeval/`` alone, entries shaped like
    ``results.json`` subsets: ``{"n", "metric", "scale", "scorer", "speech_only", "arms": {arm: {"score", "ci_low",
    "ci_high", "n", "errors", "missing", "acc_norm"}}, "forgetting", "inequivalence"}``.

    Scores are percentages (``scale`` 100) for metrics in [0, 1] (acc, acc_norm, exact_match), raw means otherwise.
    Gaps are :func:`~speechlm_eval.metrics.paired.paired_gap` over the documents scored in both arms, paired by
    ``doc_id``: forgetting = ``text_llm_text - speech_llm_text`` (lm-eval's prompt), inequivalence =
    ``speech_llm_text_ll - speech_llm_speech_ll`` (chat prompt; text vs spoken context).
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    arms = sorted(run.lmeval_records().items(), key=lambda kv: (_ARM_ORDER.get(kv[0], len(_ARM_ORDER)), kv[0]))
    by_arm = {arm: {r["id"]: r for r in records} for arm, records in arms}
    subsets: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for arm, records in by_arm.items():
        for record in records.values():
            subsets.setdefault(record["subset"], {}).setdefault(arm, {})[record["id"]] = record
    fragment: dict[str, Any] = {}
    for subset in sorted(subsets):
        # One prompt format per row: lm-eval's own prompt for the two harness arms (forgetting), the chat template for
        # the log-likelihood arms (inequivalence), so no row compares numbers made two ways.
        harness = {a: r for a, r in subsets[subset].items() if a not in LMEVAL_SPOKEN_ARMS}
        spoken = {a: r for a, r in subsets[subset].items() if a in LMEVAL_SPOKEN_ARMS}
        if harness:
            fragment[subset] = dict(_subset_entry(harness, seed, n_resamples), prompt_format=HARNESS_FORMAT)
        if spoken:
            fragment[spoken_name(subset)] = dict(_subset_entry(spoken, seed, n_resamples, harness),
                                                 prompt_format=SPOKEN_FORMAT)
    notes_path = run.lmeval_dir / NOTES_FILE
    if notes_path.exists():
        for task, task_notes in read_notes(notes_path).items():
            for name in (f"lmeval:{task}", spoken_name(f"lmeval:{task}")):
                if name in fragment:
                    fragment[name]["notes"] = task_notes
    return fragment


HARNESS_FORMAT = "lm-eval's prompt (as --model hf scores it)"
SPOKEN_FORMAT = "the speech LLM's chat template, log-likelihood of each choice given the typed vs spoken question"
SPOKEN_SUFFIX = " (spoken, log-lik.)"


def spoken_name(subset: str) -> str:
    """The results.json name of a task's spoken log-likelihood row: ``lmeval:<task> (spoken, log-lik.)``."""
    return subset + SPOKEN_SUFFIX


def read_notes(path: Path) -> dict[str, list[str]]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))


def _subset_entry(arms: dict[str, dict[str, dict[str, Any]]], seed: int, n_resamples: int,
                  metric_from: dict[str, dict[str, dict[str, Any]]] | None = None) -> dict[str, Any]:
    source = metric_from if metric_from else arms
    harness = [r for arm in HARNESS_ARMS for r in source.get(arm, {}).values()]
    metric = primary_metric(harness) if harness else "acc"
    ids = sorted({i for records in arms.values() for i in records}, key=_doc_order)
    values = [r.get(metric) for records in arms.values() for r in records.values() if r.get(metric) is not None]
    scale = 100.0 if all(0.0 <= v <= 1.0 for v in values) else 1.0
    entry: dict[str, Any] = {"n": len(ids), "metric": metric, "scale": scale, "scorer": "lm-eval",
                             "speech_only": False, "arms": {}}
    for arm, records in arms.items():
        ok = [r for r in records.values() if r.get("error") is None and r.get(metric) is not None]
        arm_entry: dict[str, Any] = {
            "n": len(ok),
            "errors": sum(r.get("error") is not None for r in records.values()),
            "missing": sum(i not in records for i in ids),
        }
        if ok:
            score, low, high = mean_ci(np.array([r[metric] for r in ok]), scale=scale, n_resamples=n_resamples,
                                       seed=seed)
            norm = [r["acc_norm"] for r in ok if r.get("acc_norm") is not None]
            arm_entry.update(score=score, ci_low=low, ci_high=high,
                             acc_norm=100.0 * float(np.mean(norm)) if norm else None)
        else:
            arm_entry.update(score=None, ci_low=None, ci_high=None, acc_norm=None)
        entry["arms"][arm] = arm_entry
    for gap, (first, second) in LMEVAL_GAPS.items():
        if first in arms and second in arms:
            both = [i for i in ids if _scored(arms[first].get(i), metric) and _scored(arms[second].get(i), metric)]
            a = np.array([arms[first][i][metric] for i in both], dtype=float)
            b = np.array([arms[second][i][metric] for i in both], dtype=float)
            entry[gap] = paired_gap(a, b, scale=scale, n_resamples=n_resamples, seed=seed).to_dict()
    return entry


def _scored(record: dict[str, Any] | None, metric: str) -> bool:
    return record is not None and record.get("error") is None and record.get(metric) is not None


def _doc_order(record_id: str) -> tuple[str, int]:
    task, _, doc_id = record_id.rpartition("/")
    return task, int(doc_id) if doc_id.isdigit() else -1
