"""Any lm-eval task as a forgetting probe: run it on the speech LLM's text path and on the text LLM, keep every
document's score as a record, and report the paired gaps in the shape of ``results.json`` subsets.

Layout under ``out_dir/lmeval/``: ``<arm>.jsonl`` (one record per (task, doc_id); arms ``text_llm_text`` and
``speech_llm_text`` from lm-eval's own prompts, plus ``speech_llm_text_ll`` / ``speech_llm_speech_ll`` from
:mod:`speechlm_eval.lmeval.spoken` when asked) and ``<arm>.results.json`` (lm-eval's aggregate output and config,
without the samples). :func:`lmeval_results_fragment` rebuilds the numbers from the records alone.

``python -m speechlm_eval.lmeval.run ...`` is lm-eval's own command line with the ``speechlm`` model registered.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from speechlm_eval.metrics.paired import mean_ci, paired_gap
from speechlm_eval.models.base import SpeechLM
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.records import dumps, read_records, write_text_atomic

HARNESS_ARMS: tuple[str, str] = ("text_llm_text", "speech_llm_text")
# (first, second) of each gap: gap = first - second, as in speechlm_eval.report.build.GAPS.
LMEVAL_GAPS = {"forgetting": HARNESS_ARMS, "inequivalence": ("speech_llm_text_ll", "speech_llm_speech_ll")}
_ARM_ORDER = {arm: i for i, arm in enumerate([*HARNESS_ARMS, *LMEVAL_GAPS["inequivalence"]])}
# Keys of an lm-eval logged sample that are not per-document metrics.
_SAMPLE_FIELDS = {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash",
                  "prompt_hash", "target_hash"}


def task_manager_for(tasks: Sequence[str], include_path: str | Path | None):
    """``TaskManager(include_path, include_defaults=False)`` when every task is found there (no indexing of lm-eval's
    ~10k built-in tasks, nothing that needs the network), else a manager with the built-in tasks as well."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def harness_records(samples: dict[str, list[dict[str, Any]]], arm: str) -> list[dict[str, Any]]:
    """Records from lm-eval's logged samples (``results["samples"]``): one per (task, doc_id).

    Each record holds the document's metrics at top level (``acc``, ``acc_norm``... of filter ``none``, or of the
    task's first filter) and every filter's under ``metrics`` as ``"<metric>,<filter>"`` (lm-eval's naming).
    Non-numeric per-document values (``f1``'s ``(gold, pred)`` pairs) are kept only under ``metrics``.
    """
    records: dict[str, dict[str, Any]] = {}
    for task, task_samples in samples.items():
        filters = list(dict.fromkeys(s["filter"] for s in task_samples))
        main_filter = "none" if "none" in filters else filters[0]
        for sample in task_samples:
            doc_id = int(sample["doc_id"])
            key = f"lmeval/{task}/{doc_id}"
            record = records.setdefault(key, {"id": key, "subset": f"lmeval:{task}", "arm": arm, "task": task,
                                              "doc_id": doc_id, "filter": main_filter, "metric_names": [],
                                              "metrics": {}, "error": None})
            names = sample.get("metrics") or [k for k in sample if k not in _SAMPLE_FIELDS]
            for name in names:
                value = _plain(sample[name])
                record["metrics"][f"{name},{sample['filter']}"] = value
                if sample["filter"] == main_filter:
                    if name not in record["metric_names"]:
                        record["metric_names"].append(name)
                    if isinstance(value, (int, float)):  # bools included
                        record[name] = float(value)
    return list(records.values())


def evaluate_harness_arm(model: Any, tasks: Sequence[str], task_manager: Any, *, limit: int | float | None,
                         batch_size: int, seed: int, apply_chat_template: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on an already built lm-eval model, logging every sample."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        batch_size=batch_size,
        log_samples=True,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        apply_chat_template=apply_chat_template,
        # Our CIs are the paired bootstrap over the records; lm-eval's stderr bootstrap would only cost time.
        bootstrap_iters=0,
    )


def run_lmeval_tasks(
    speech_model_path: str | SpeechLM,
    text_model_path: str | SpeechLM | None,
    tasks: list[str],
    include_path: str | None,
    out_dir: Path,
    limit: int | float | None = None,
    batch_size: int = 8,
    seed: int = 0,
    *,
    spoken: bool = False,
    load_options: LoadOptions = LoadOptions(),
    tts: Any = None,
    n_resamples: int = 10_000,
    apply_chat_template: bool = False,
) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the speech LLM's text path and on the text LLM; return the ``lmeval:<task>`` subsets.

    Runs in one process: under a multi-process launch only the main process works and the others return ``{}``.

    Args:
        speech_model_path, text_model_path: checkpoints our registry loads with ``load_options`` (family detected), or
            adapters already loaded (e.g. the gap run's); ``text_model_path=None``: no forgetting.
        tasks: lm-eval task / group names; groups are reported per leaf task.
        include_path: a folder of local task YAMLs; when it holds every named task, lm-eval's built-in tasks are not
            indexed (see :func:`task_manager_for`).
        out_dir: the run directory; records go to ``out_dir/lmeval/`` (replacing any earlier lm-eval records there).
        limit: documents per task (lm-eval's ``--limit``: an int, or a fraction below 1).
        spoken: also run the spoken log-likelihood arms (:mod:`speechlm_eval.lmeval.spoken`) on the
            ``multiple_choice`` tasks, with ``tts`` (default ``CachedTTS(get_tts("espeak-ng"))``).
        apply_chat_template: lm-eval's ``--apply_chat_template`` for the two harness arms (default off: lm-eval's
            raw prompt, as ``--model hf`` scores it).

    Returns:
        ``{"lmeval:<task>": subset entry}`` as :func:`lmeval_results_fragment` builds it from the records written.
    """
    from speechlm_eval.distributed import process_state
    from speechlm_eval.lmeval.model import SpeechLMHarness

    if not process_state().is_main_process:
        return {}
    root = Path(out_dir) / "lmeval"
    for stale in [*root.glob("*.jsonl"), *root.glob("*.results.json")]:
        stale.unlink()  # a previous lm-eval run here (other tasks, arms): every record is recomputed
    manager = task_manager_for(tasks, include_path)
    notes: dict[str, list[str]] = {}
    arms = [("speech_llm_text", speech_model_path)]
    if text_model_path is not None:
        arms.append(("text_llm_text", text_model_path))
    for arm, model in arms:
        adapter = load_model(str(model), load_options) if isinstance(model, (str, Path)) else model
        harness = SpeechLMHarness(adapter, batch_size=batch_size)
        results = evaluate_harness_arm(harness, tasks, manager, limit=limit, batch_size=batch_size, seed=seed,
                                       apply_chat_template=apply_chat_template)
        write_records(root / f"{arm}.jsonl", harness_records(results.get("samples", {}), arm))
        summary = {k: v for k, v in results.items() if k != "samples"}
        write_text_atomic(root / f"{arm}.results.json",
                          json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        if arm == "speech_llm_text" and spoken:
            notes = run_spoken_arms(adapter, manager, tasks, root, limit=limit, batch_size=batch_size, tts=tts)
        del harness, adapter
        gc.collect()
    fragment = lmeval_results_fragment(out_dir, seed=seed, n_resamples=n_resamples)
    for task, task_notes in notes.items():
        if f"lmeval:{task}" in fragment:
            fragment[f"lmeval:{task}"]["notes"] = task_notes
    return fragment


def run_spoken_arms(adapter: Any, task_manager: Any, tasks: Sequence[str], root: Path, *,
                    limit: int | float | None, batch_size: int, tts: Any = None) -> dict[str, list[str]]:
    """Write the two spoken arms' records (``root/<arm>.jsonl``) for every ``multiple_choice`` leaf task of ``tasks``;
    returns ``{task: [note]}`` for the tasks it could not ask."""
    from speechlm_eval.lmeval.spoken import SPOKEN_ARMS, UnsupportedTask, choice_docs, spoken_records
    from speechlm_eval.speech import CachedTTS, get_tts

    speaker = tts if tts is not None else CachedTTS(get_tts("espeak-ng"))
    notes: dict[str, list[str]] = {}
    records: dict[str, list[dict[str, Any]]] = {arm: [] for arm in SPOKEN_ARMS}
    for name, task in task_manager.load(list(tasks))["tasks"].items():
        try:
            docs = choice_docs(task, name, limit)
        except UnsupportedTask as error:
            notes.setdefault(name, []).append(f"spoken arms not run: {error}")
            continue
        for arm, arm_records in spoken_records(adapter, docs, speaker.synthesize, batch_size).items():
            records[arm].extend(arm_records)
    for arm, arm_records in records.items():
        write_records(root / f"{arm}.jsonl", arm_records)
    return notes


def write_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    write_text_atomic(Path(path), "".join(dumps(r) + "\n" for r in records))


def primary_metric(records: Sequence[dict[str, Any]]) -> str:
    """``acc`` when the documents have it, else the first numeric per-document metric lm-eval logged."""
    names = [n for r in records for n in r.get("metric_names", ["acc"])]
    numeric = [n for n in dict.fromkeys(names) if any(isinstance(r.get(n), float) for r in records)]
    return "acc" if "acc" in numeric or not numeric else numeric[0]


def lmeval_results_fragment(out_dir: Path, seed: int = 0, n_resamples: int = 10_000) -> dict[str, Any]:
    """``{"lmeval:<task>": entry}`` from the records under ``out_dir/lmeval/`` alone, entries shaped like
    ``results.json`` subsets: ``{"n", "metric", "scale", "scorer", "speech_only", "arms": {arm: {"score", "ci_low",
    "ci_high", "n", "errors", "missing", "acc_norm"}}, "forgetting", "inequivalence"}``.

    Scores are percentages (``scale`` 100) for metrics in [0, 1] (acc, acc_norm, exact_match), raw means otherwise.
    Gaps are :func:`~speechlm_eval.metrics.paired.paired_gap` over the documents scored in both arms, paired by
    ``doc_id``: forgetting = ``text_llm_text - speech_llm_text`` (lm-eval's prompt), inequivalence =
    ``speech_llm_text_ll - speech_llm_speech_ll`` (chat prompt; text vs spoken context).
    """
    root = Path(out_dir) / "lmeval"
    by_arm: dict[str, dict[str, dict[str, Any]]] = {}
    for path in sorted(root.glob("*.jsonl"), key=lambda p: (_ARM_ORDER.get(p.stem, len(_ARM_ORDER)), p.stem)):
        by_arm[path.stem] = {r["id"]: r for r in read_records(path)}
    subsets: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for arm, records in by_arm.items():
        for record in records.values():
            subsets.setdefault(record["subset"], {}).setdefault(arm, {})[record["id"]] = record
    fragment = {}
    for subset in sorted(subsets):
        fragment[subset] = _subset_entry(subsets[subset], seed, n_resamples)
    return fragment


def _subset_entry(arms: dict[str, dict[str, dict[str, Any]]], seed: int, n_resamples: int) -> dict[str, Any]:
    harness = [r for arm in HARNESS_ARMS for r in arms.get(arm, {}).values()]
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


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a per-document metric value (numpy scalars, tuples)."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def lm_eval_cli() -> None:
    """lm-eval's command line with our ``speechlm`` model registered (lm-eval has no plugin entry point)."""
    import speechlm_eval.lmeval.model  # noqa: F401 - registers "speechlm"
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    lm_eval_cli()
