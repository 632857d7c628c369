"""Re-scoring outputs already written in the official formats (VoiceBench's ``main.py``/``api_judge.py`` JSONL, MMAU's
JSON with ``model_output``) with our official-rule scorers: no model, no run directory.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from speechlm_eval.data import voicebench
from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import DataError
from speechlm_eval.scoring import load_builtin_scorers
from speechlm_eval.scoring.base import Score, item_rng
from speechlm_eval.scoring.constants import MMAU_OUTPUT_KEY
from speechlm_eval.scoring.mmau import aggregate_official_json
from speechlm_eval.scoring.registry import Scorer, get_scorer

# Scorers not among the built-ins: the module that registers each (written separately; may be absent).
OPTIONAL_SCORER_MODULES: dict[str, str] = {"ifeval": "ifeval", "open": "open_ended", "qa": "qa"}
# Scorers whose per-item value is a grade (1-5 judge mean), not a right/wrong outcome: no ``correct`` flag.
GRADED_SCORERS: frozenset[str] = frozenset({"open"})
# Subsets whose official evaluator reads the judge's ``score`` list, i.e. the ``result-`` file of api_judge.py.
JUDGED_SCORERS: frozenset[str] = frozenset({"open", "qa"})
# Columns VoiceBench's scripts add to the dataset's: main.py's answer and api_judge.py's judge outputs.
OUTPUT_COLUMNS: frozenset[str] = frozenset({"response", "score"})
MMAU_REQUIRED_KEYS: tuple[str, ...] = ("answer", "choices", "task", "difficulty")
MMAU_SUMMARY_KEYS: tuple[str, ...] = ("total_accuracy", "n", "task", "difficulty", "sub_category")


class RescoreError(ValueError):
    """Input that cannot be re-scored: a missing file, a line that is not JSON, a missing column, an unknown subset."""


@dataclass(frozen=True)
class Rescored:
    """The result of re-scoring one file: the official metrics and one per-item line per input item, in input order."""

    metrics: dict[str, Any]
    per_item: list[dict[str, Any]]


# ------------------------------------------------------------------------------------------------------ reading


def read_jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of every non-blank line of a JSONL file; errors name ``file:line``."""
    if not path.is_file():
        raise RescoreError(f"{path}: no such file")
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RescoreError(f"{path}: not a JSON file ({error})") from error
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise RescoreError(f"{path}: expected a JSON list of item objects (MMAU's format)")
    return data


# ------------------------------------------------------------------------------------------------- VoiceBench


def voicebench_scorer(subset: str) -> Scorer:
    """The registered scorer of a VoiceBench subset; says which scorer module is missing when it is not installed."""
    try:
        info = voicebench.subset_info(subset)
    except DataError as error:
        raise RescoreError(str(error)) from None
    load_builtin_scorers()
    module = OPTIONAL_SCORER_MODULES.get(info.scorer)
    if module is not None:
        try:
            importlib.import_module(f"speechlm_eval.scoring.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"speechlm_eval.scoring.{module}":
                raise  # the module exists but one of its own dependencies is missing: show that, not a vague error
            raise RescoreError(
                f"the {info.scorer!r} scorer (module speechlm_eval.scoring.{module}) is not available in this "
                f"installation, so {subset} cannot be scored yet"
            ) from None
    try:
        return get_scorer(info.scorer)
    except KeyError as error:
        raise RescoreError(f"{subset}: {error.args[0]}") from None


def required_columns(subset: str) -> tuple[str, ...]:
    """Columns every row of a VoiceBench output file of ``subset`` must hold (non-null) to be scored officially."""
    scorer = voicebench.subset_info(subset).scorer
    judged = ("score",) if scorer in JUDGED_SCORERS else ()
    return ("prompt", "response", *voicebench.REQUIRED_COLUMNS[scorer], *judged)


def _check_row(path: Path, number: int, row: Mapping[str, Any], columns: Sequence[str], scorer: str) -> None:
    for column in columns:
        if row.get(column) is None:
            hint = " (open/qa are scored from api_judge.py's result- file)" if column == "score" else ""
            raise RescoreError(f"{path}:{number}: missing column `{column}`{hint}")
    if not isinstance(row["response"], str):
        raise RescoreError(f"{path}:{number}: `response` must be a string, got {type(row['response']).__name__}")
    if scorer in JUDGED_SCORERS:
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
    scorers look them up (:func:`speechlm_eval.scoring.judge.judge_outputs_for`)."""
    from speechlm_eval.scoring.judge import attach_judgements, response_key

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
        _check_row(path, number, row, columns, scorer.name)
    items = rows_to_items(rows, subset, split or default_split(subset), path)
    responses = prompt_keyed_responses(rows) if scorer.name == "ifeval" else [row["response"] for _, row in rows]
    scored_items: Sequence[Any] = with_judgements(items, responses, rows) if scorer.name in JUDGED_SCORERS else items
    try:
        scores = [scorer.score(item, response, item_rng(seed, item.id))
                  for item, response in zip(scored_items, responses, strict=True)]
        metrics = scorer.aggregate(scored_items, scores)
    except (ValueError, LookupError, TypeError) as error:
        raise RescoreError(f"{path}: {error}") from None
    graded = scorer.name in GRADED_SCORERS
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


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (strict JSON), recursing into dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_per_item(path: Path, lines: Sequence[Mapping[str, Any]]) -> None:
    """The ``--per-item`` JSONL file: one object per input item, in input order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(json_safe(dict(line)), ensure_ascii=False, default=str) + "\n" for line in lines)
    path.write_text(text, encoding="utf-8")
