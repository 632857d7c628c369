"""Any lm-eval task as a forgetting probe: run it on the speech LLM's text path and on the text LLM, keep every
document's score as a record, and report the paired gaps in the shape of ``results.json`` subsets.

Layout under ``out_dir/lmeval/``: ``<arm>.jsonl`` (one record per (task, doc_id); arms ``text_llm_text`` and
``speech_llm_text`` from lm-eval's own prompts, plus ``speech_llm_text_ll`` / ``speech_llm_speech_ll`` from
:mod:`speechlm_eval.lmeval.spoken` when asked) and ``<arm>.results.json`` (lm-eval's aggregate output and config,
without the samples) and ``notes.json``; :func:`speechlm_eval.report.lmeval.lmeval_results` computes the numbers from
them alone.

``python -m speechlm_eval.lmeval.run ...`` is lm-eval's own command line with the ``speechlm`` model registered.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any, Sequence


from speechlm_eval.models.base import SpeechLM
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.records import dumps, json_safe, write_json_atomic, write_text_atomic
from speechlm_eval.rundir import LMEVAL_GAPS, SPEECH_LLM_TEXT, TEXT_LLM_TEXT

HARNESS_ARMS: tuple[str, str] = tuple(LMEVAL_GAPS["forgetting"])  # type: ignore[assignment]
NOTES_FILE = "notes.json"  # {task: [note]} for tasks whose spoken arms could not be run (read by report.lmeval)
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


def unknown_tasks(tasks: Sequence[str], include_path: str | Path | None) -> list[str]:
    """The names in ``tasks`` that lm-eval (with ``include_path``) knows as no task, group or tag: checked before
    any model loads, so a typo does not end a run after hours of inference."""
    manager = task_manager_for(tasks, include_path)
    return [t for t in tasks if t not in manager.all_tasks]


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
                value = json_safe(sample[name])
                record["metrics"][f"{name},{sample['filter']}"] = value
                if sample["filter"] == main_filter:
                    if name not in record["metric_names"]:
                        record["metric_names"].append(name)
                    if isinstance(value, (int, float)):  # bools included
                        record[name] = float(value)
    return list(records.values())


def evaluate_harness_arm(model: Any, tasks: Sequence[str], task_manager: Any, *, limit: int | float | None,
                         batch_size: int, seed: int, apply_chat_template: bool = False, num_fewshot: int | None = None,
                         gen_kwargs: str | None = None) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on an already built lm-eval model, logging every sample (``num_fewshot`` and
    ``gen_kwargs`` as lm-eval's ``--num_fewshot`` / ``--gen_kwargs``)."""
    import lm_eval

    return lm_eval.simple_evaluate(
        model=model,
        tasks=list(tasks),
        task_manager=task_manager,
        limit=limit,
        num_fewshot=num_fewshot,
        gen_kwargs=gen_kwargs,
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
    apply_chat_template: bool = False,
    num_fewshot: int | None = None,
    gen_kwargs: str | None = None,
) -> dict[str, list[str]]:
    """Run lm-eval ``tasks`` on the speech LLM's text path and on the text LLM, writing their records.

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
        ``{task: [note]}`` for the tasks whose spoken arms could not be run (also written to ``lmeval/notes.json``);
        the scores are :func:`speechlm_eval.report.lmeval.lmeval_results` of the run directory.
    """
    from speechlm_eval.distributed import process_state
    from speechlm_eval.lmeval.model import SpeechLMHarness

    if not process_state().is_main_process:
        return {}
    root = Path(out_dir) / "lmeval"
    for stale in [*root.glob("*.jsonl"), *root.glob("*.results.json"), *root.glob(NOTES_FILE)]:
        stale.unlink()  # a previous lm-eval run here (other tasks, arms): every record is recomputed
    manager = task_manager_for(tasks, include_path)
    notes: dict[str, list[str]] = {}
    arms = [(SPEECH_LLM_TEXT, speech_model_path)]
    if text_model_path is not None:
        arms.append((TEXT_LLM_TEXT, text_model_path))
    for arm, model in arms:
        adapter = load_model(str(model), load_options) if isinstance(model, (str, Path)) else model
        harness = SpeechLMHarness(adapter, batch_size=batch_size)
        results = evaluate_harness_arm(harness, tasks, manager, limit=limit, batch_size=batch_size, seed=seed,
                                       apply_chat_template=apply_chat_template, num_fewshot=num_fewshot,
                                       gen_kwargs=gen_kwargs)
        write_records(root / f"{arm}.jsonl", harness_records(results.get("samples", {}), arm))
        summary = {k: v for k, v in results.items() if k != "samples"}
        write_text_atomic(root / f"{arm}.results.json",
                          json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
        if arm == SPEECH_LLM_TEXT and spoken:
            notes = run_spoken_arms(adapter, manager, tasks, root, limit=limit, batch_size=batch_size, tts=tts)
        del harness, adapter
        gc.collect()
    if notes:
        write_json_atomic(root / NOTES_FILE, notes)
    return notes


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


def lm_eval_cli() -> None:
    """lm-eval's command line with our ``speechlm`` model registered (lm-eval has no plugin entry point)."""
    import speechlm_eval.lmeval.model  # noqa: F401 - registers "speechlm"
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    lm_eval_cli()
