"""Prompt parity of served models (``gap --parity-check K``): the first K items of each served arm are answered
in-process too, on the same checkpoint, and compared with the endpoint's answers in the run's records.

Why: a served model is only the model evaluated in-process if the server builds the same prompt (chat template,
system prompt, audio placement and features) and decodes greedily. Identical greedy answers and equal prompt token
counts on both sides show it did; each difference is listed in the report. The endpoint's side is the run's own
records (what the gap was scored on); the in-process side answers each prompt alone, as the server sees it, so no
padding enters the comparison.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from speechlm_eval.data.item import Item
from speechlm_eval.models.base import GenerationConfig, SpeechLM
from speechlm_eval.records import RecordWriter
from speechlm_eval.rundir import PARITY, RunDir
from speechlm_eval.runner import build_prompt


@dataclass(frozen=True)
class ParityArm:
    """One served arm to check: its name, the in-process model of the same checkpoint, whether it hears audio."""

    name: str
    local: SpeechLM
    with_audio: bool
    system: str | None = None  # the run's system turn, as the served arm sent it


def parity_items(items: Sequence[Item], arm: ParityArm, k: int) -> list[Item]:
    """The first ``k`` items (run order) the arm answers: every item for an audio arm, text-equivalent ones else."""
    return [i for i in items if arm.with_audio or i.has_text_equivalent][:k]


def run_parity_check(run_dir: Path, items: Sequence[Item], arms: Sequence[ParityArm], k: int,
                     generation: GenerationConfig, audio_source: Callable[[Item], Any]) -> None:
    """Append one ``records/parity.jsonl`` record per checked item: for each of its arms, both answers and token
    counts. Resumes like the arms (a recorded item is not asked again); run in one process, after the arms merged."""
    run = RunDir(run_dir)
    served = {arm.name: run.records(arm.name) for arm in arms}
    chosen = {arm.name: {i.id for i in parity_items(items, arm, k)} for arm in arms}
    done = run.completed_ids(PARITY)
    todo = [i for i in items if i.id not in done and any(i.id in ids for ids in chosen.values())]
    with RecordWriter(run.records_path(PARITY)) as writer:
        for item in todo:
            entries = {arm.name: compare(item, arm, served[arm.name].get(item.id), generation, audio_source)
                       for arm in arms if item.id in chosen[arm.name]}
            writer.write_many([{"id": item.id, "subset": item.subset, "arm": PARITY, "error": None,
                                "arms": entries}])


def compare(item: Item, arm: ParityArm, record: dict[str, Any] | None, generation: GenerationConfig,
            audio_source: Callable[[Item], Any]) -> dict[str, Any]:
    """One arm's comparison for one item; a side that has no answer is named instead of compared."""
    if record is None or record.get("error") is not None:
        problem = record["error"]["message"] if record is not None else "no record"
        return {"compared": False, "reason": f"served: {problem}"}
    try:
        (local,) = arm.local.generate([build_prompt(item, arm.with_audio, audio_source, arm.system)], generation)
    except Exception as error:  # noqa: BLE001 - the in-process side's own failure is reported, not fatal
        return {"compared": False, "reason": f"in-process: {type(error).__name__}: {error}"}
    return {
        "compared": True,
        "identical": record["response"] == local.text,
        "served": record["response"],
        "in_process": local.text,
        "served_prompt_tokens": record.get("n_prompt_tokens"),
        "in_process_prompt_tokens": local.n_prompt_tokens,
        "served_new_tokens": record.get("n_new_tokens"),
        "in_process_new_tokens": local.n_new_tokens,
    }
