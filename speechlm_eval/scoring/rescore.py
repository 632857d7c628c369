"""Re-scoring outputs already written in the official formats (VoiceBench's ``main.py``/``api_judge.py`` JSONL, MMAU's
JSON with ``model_output``) with our official-rule scorers: no model, no run directory.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from speechlm_eval.data import voicebench
from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import DataError
from speechlm_eval.scoring.base import Score, item_rng
from speechlm_eval.scoring.constants import MMAU_OUTPUT_KEY
from speechlm_eval.records import json_safe
from speechlm_eval.scoring.mmau import aggregate_official_json
from speechlm_eval.scoring.registry import Scorer, get_scorer

# Columns VoiceBench's scripts add to the dataset's: main.py's answer and api_judge.py's judge outputs.
OUTPUT_COLUMNS: frozenset[str] = frozenset({"response", "score", "speechlm_eval"})
# ``speechlm-eval export --format voicebench`` writes {"id", "arm"} of the gap run under this key, so a re-score draws
# the same seeded fallbacks as the run did; files from other tools do not have it.
PROVENANCE_COLUMN = "speechlm_eval"
MMAU_REQUIRED_KEYS: tuple[str, ...] = ("answer", "choices", "task", "difficulty")
MMAU_SUMMARY_KEYS: tuple[str, ...] = ("total_accuracy", "n", "task", "difficulty", "sub_category")


@dataclass
class VoiceBenchScoreConfig:
    """``speechlm-eval score voicebench``: one VoiceBench output file and the subset it answers."""

    file: Path = field(metadata={"argument": True, "help": "VoiceBench main.py output (.jsonl: dataset columns + "
                                 "`response`); for open/qa subsets the api_judge.py `result-` file (with `score`)."})
    subset: str = field(metadata={"help": "VoiceBench subset the file answers (openbookqa, mmsu, bbh, advbench, "
                                  "...); selects the official scorer."})
    per_item: Path | None = field(default=None, metadata={
        "help": "Write one JSON line per input item (index, id, extracted, parsed, correct, score)."})
    seed: int = field(default=0, metadata={
        "help": "Seed of the draw that replaces upstream's unseeded random answer for unparsed responses."})
    split: str | None = field(default=None, metadata={
        "help": "Split name used in item ids (default: the subset's own split, or 'all')."})


@dataclass
class MmauScoreConfig:
    """``speechlm-eval score mmau``: one MMAU prediction file."""

    file: Path = field(metadata={"argument": True,
                                 "help": "MMAU JSON (the benchmark list, predictions under `model_output`)."})
    per_item: Path | None = field(default=None, metadata={
        "help": "Write one JSON line per input item (score null where the official script skips it)."})


class RescoreError(ValueError):
    """Input that cannot be re-scored: a missing file, a line that is not JSON, a missing column, an unknown subset."""


@dataclass(frozen=True)
class Rescored:
    """The result of re-scoring one file: the official metrics and one per-item line per input item, in input order."""

    metrics: dict[str, Any]
    per_item: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------------ reading


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (the official tools write UTF-8); :class:`RescoreError` naming the line otherwise."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise RescoreError(f"{path}:{line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
                           "re-save it as UTF-8") from None


def read_jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of every non-blank line of a JSONL file; errors name ``file:line``."""
    if not path.is_file():
        raise RescoreError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise RescoreError(f"{path}:{number}: not a JSON line ({error})") from error
        if not isinstance(row, dict):
            raise RescoreError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    if not rows:
        raise RescoreError(f"{path}: no rows to score")
    return rows


def read_mmau_json(path: Path) -> list[dict[str, Any]]:
    """The benchmark list of an MMAU ``--input`` file (each item's prediction under ``model_output``)."""
    if not path.is_file():
        raise RescoreError(f"{path}: no such file")
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        raise RescoreError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise RescoreError(f"{path}: expected a JSON list of item objects (MMAU's format)")
    return data


# ------------------------------------------------------------------------------------------------- VoiceBench


def voicebench_scorer(subset: str) -> Scorer:
    """The registered scorer of a VoiceBench subset (:class:`RescoreError` for an unknown subset)."""
    try:
        info = voicebench.subset_info(subset)
    except DataError as error:
        raise RescoreError(str(error)) from None
    try:
        return get_scorer(info.scorer)
    except KeyError as error:
        raise RescoreError(f"{subset}: {error.args[0]}") from None


def required_columns(subset: str) -> tuple[str, ...]:
    """Columns every row of a VoiceBench output file of ``subset`` must hold (non-null) to be scored officially."""
    scorer = voicebench.subset_info(subset).scorer
    # The judged subsets' official evaluator reads the judge's ``score`` list: api_judge.py's ``result-`` file.
    judged = ("score",) if get_scorer(scorer).judged else ()
    return ("prompt", "response", *voicebench.REQUIRED_COLUMNS[scorer], *judged)


def _check_row(path: Path, number: int, row: Mapping[str, Any], columns: Sequence[str], scorer: Scorer) -> None:
    for column in columns:
        if row.get(column) is None:
            hint = " (open/qa are scored from api_judge.py's result- file)" if column == "score" else ""
            raise RescoreError(f"{path}:{number}: missing column `{column}`{hint}")
    if not isinstance(row["response"], str):
        raise RescoreError(f"{path}:{number}: `response` must be a string, got {type(row['response']).__name__}")
    if scorer.judged:
        outputs = row["score"]
        if not isinstance(outputs, list) or not outputs or not all(isinstance(o, str) for o in outputs):
            raise RescoreError(f"{path}:{number}: `score` must be the non-empty list of judge outputs (strings)")


def default_split(subset: str) -> str:
    """The split named in item ids when none is given: the subset's only default split, else ``all``."""
    splits = voicebench.subset_info(subset).default_splits
    return splits[0] if len(splits) == 1 else voicebench.ALL_SPLITS


def rows_to_items(rows: Sequence[tuple[int, Mapping[str, Any]]], subset: str, split: str, path: Path) -> list[Item]:
    """Items built from output rows exactly as the VoiceBench loader builds them from dataset rows: the columns the
    output files add (``response``, the judge's ``score``) are left out; the rest (e.g. bbh's ``id``) go to ``meta``."""
    items = []
    for index, (number, row) in enumerate(rows):
        source = {key: value for key, value in row.items() if key not in OUTPUT_COLUMNS}
        try:
            items.append(voicebench.row_to_item(source, subset=subset, split=split, index=index,
                                                origin=f"{path}:{number}"))
        except DataError as error:
            raise RescoreError(str(error)) from None
    return items


def with_judgements(items: Sequence[Item], responses: Sequence[str],
                     rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[Any]:
    """Scorer-facing items carrying each row's judge outputs (its ``score`` list) for its response, where the open/qa
    scorers look them up (:func:`speechlm_eval.scoring.judged.judge_outputs_for`)."""
    from speechlm_eval.scoring.judged import attach_judgements, response_key

    return [
        attach_judgements(item, [{"id": item.id, "response_sha256": response_key(response), "outputs": row["score"]}])
        for item, response, (_, row) in zip(items, responses, rows, strict=True)
    ]


def prompt_keyed_responses(rows: Sequence[tuple[int, Mapping[str, Any]]]) -> list[str]:
    """ifeval's lookup: upstream maps ``prompt -> response`` over the file, so items sharing a prompt all get the
    *last* response written for it (replicated, not fixed). The ifeval aggregate does this too; doing it here as well
    makes each ``--per-item`` line the score upstream gives that item."""
    by_prompt = {row["prompt"]: row["response"] for _, row in rows}
    return [by_prompt[row["prompt"]] for _, row in rows]


def per_item_line(index: int, item_id: Any, score: Score | None, graded: bool) -> dict[str, Any]:
    """One ``--per-item`` line; ``score`` None means the official script skipped the item."""
    if score is None:
        return {"index": index, "id": item_id, "extracted": None, "parsed": False, "correct": None, "score": None}
    binary = score.value in (0.0, 1.0) and not graded
    return {
        "index": index, "id": item_id, "extracted": score.extracted, "parsed": score.parsed,
        "correct": (score.value == 1.0) if binary else None, "score": score.value,
    }


def _draw_keys(row: Mapping[str, Any], item_id: str) -> tuple[str, ...]:
    """The keys of an item's seeded fallback draw: the gap run's (id, arm) for a file it exported, else the id."""
    provenance = row.get(PROVENANCE_COLUMN)
    if isinstance(provenance, Mapping) and isinstance(provenance.get("id"), str) and isinstance(provenance.get("arm"), str):
        return provenance["id"], provenance["arm"]
    return (item_id,)


def rescore_voicebench(path: Path, subset: str, *, seed: int = 0, split: str | None = None) -> Rescored:
    """Score a VoiceBench output file (dataset columns + ``response``; for open/qa the ``result-`` file with ``score``).

    Unparsed responses get the seeded draw ``item_rng(seed, item id)`` where upstream draws unseeded. ``metrics`` is the
    scorer's official dict (``acc``/``fail``, ``refusal_rate``, ...).
    """
    path = Path(path)
    scorer = voicebench_scorer(subset)
    rows = read_jsonl_rows(path)
    columns = required_columns(subset)
    for number, row in rows:
        _check_row(path, number, row, columns, scorer)
    items = rows_to_items(rows, subset, split or default_split(subset), path)
    responses = prompt_keyed_responses(rows) if scorer.name == "ifeval" else [row["response"] for _, row in rows]
    scored_items: Sequence[Any] = with_judgements(items, responses, rows) if scorer.judged else items
    rngs = [item_rng(seed, *_draw_keys(row, item.id)) for (_, row), item in zip(rows, items, strict=True)]
    try:
        scores = [scorer.score(item, response, rng)
                  for item, response, rng in zip(scored_items, responses, rngs, strict=True)]
        metrics = scorer.aggregate(scored_items, scores)
    except (ValueError, LookupError, TypeError) as error:
        raise RescoreError(f"{path}: {error}") from None
    graded = scorer.graded
    per_item = [per_item_line(i, item.id, s, graded) for i, (item, s) in enumerate(zip(items, scores, strict=True))]
    return Rescored(metrics=dict(metrics), per_item=per_item)


# ------------------------------------------------------------------------------------------------------ MMAU


def _check_mmau_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    for index, row in enumerate(rows):
        if MMAU_OUTPUT_KEY not in row:
            continue  # skipped by the official script, so it needs nothing else
        for key in MMAU_REQUIRED_KEYS:
            if key not in row:
                raise RescoreError(f"{path}: item {index} (id {row.get('id')!r}): missing key `{key}`")


def rescore_mmau(path: Path) -> Rescored:
    """Score an MMAU JSON file as the official ``evaluation.py`` does (items without ``model_output`` are skipped).

    ``metrics`` is ``{"total_accuracy", "n", "task", "difficulty", "sub_category"}`` (percentages); skipped items have
    ``"score": None`` in ``per_item``.
    """
    path = Path(path)
    rows = read_mmau_json(path)
    _check_mmau_rows(path, rows)
    try:
        summary, scored = aggregate_official_json(rows)
    except (ValueError, KeyError, TypeError) as error:
        raise RescoreError(f"{path}: {error.args[0] if error.args else error}") from None
    matches = iter(scored)  # the scored rows, in input order
    per_item = []
    for index, row in enumerate(rows):
        score = None
        if MMAU_OUTPUT_KEY in row:
            matched = bool(next(matches)["match"])
            score = Score(value=float(matched), parsed=True, extracted=matched)
        per_item.append(per_item_line(index, row.get("id"), score, graded=False))
    return Rescored(metrics={key: summary[key] for key in MMAU_SUMMARY_KEYS}, per_item=per_item)


# ------------------------------------------------------------------------------------------------------ output


def check_output_path(path: Path, flag: str = "--per-item") -> None:
    """:class:`RescoreError` before any scoring when ``path`` cannot be written (a directory, an unwritable or
    missing-and-uncreatable folder)."""
    path = Path(path)
    if path.is_dir():
        raise RescoreError(f"{flag} {path}: is a directory")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RescoreError(f"{flag} {path}: cannot write there (permission denied)")


def write_per_item(path: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    """The ``--per-item`` JSONL file: one object per input item, in input order."""
    path = Path(path)
    text = "".join(json.dumps(json_safe(dict(line)), ensure_ascii=False, default=str) + "\n" for line in lines)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise RescoreError(f"--per-item {path}: cannot write it ({error.strerror or error})") from None
