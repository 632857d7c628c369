"""MMAU test-mini (github Sakshi113/MMAU): validate the JSON, record its version, and build audio-only Items."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

from speechlm_eval.data.item import AudioRef, Item
from speechlm_eval.data.registry import Benchmark, DataError, LoadOptions, SubsetRequest

SUBSET = "mmau"
SCORER = "mmau"
MMAU_KEYS = frozenset(
    {"id", "audio_id", "question", "choices", "answer", "dataset", "task", "split", "category", "sub-category",
     "difficulty"}
)  # fmt: skip
# The official scorer (Sakshi113/MMAU evaluation.py) pre-initialises exactly these groups, in this (print) order, and
# raises KeyError on any other task/difficulty.
MMAU_TASKS: tuple[str, ...] = ("sound", "music", "speech")
MMAU_DIFFICULTIES: tuple[str, ...] = ("easy", "hard", "medium")
AUDIO_REPO = "gamma-lab-umd/MMAU-test-mini"

# sha256 of mmau-test-mini.json -> version (the file's history in Sakshi113/MMAU). Only HEAD's hash is known in full; the two older
# ones are known by their first 8 hex digits, matched as prefixes.
KNOWN_VERSIONS: dict[str, str] = {
    "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c": "HEAD f0a4a97d (2025-08-09)",
    "e0042de8": "MMAU-v05.15.25 (8415fc1f, 2025-05-24)",
    "e8cc0922": "original v1 (1f675a9a, 2025-03-25)",
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def mmau_version(path: str | Path) -> dict[str, Any]:
    """``{"path", "sha256", "version", "known"}`` of an MMAU JSON; ``version`` is None for an unknown file."""
    sha = _sha256(Path(path))
    version = next((name for key, name in KNOWN_VERSIONS.items() if sha.startswith(key)), None)
    return {"path": str(path), "sha256": sha, "version": version, "known": version is not None}


def mmau_prompt(question: str, choices: Sequence[str]) -> str:
    """The text sent with the clip: the question, the choices one per line, then how to answer.

    MMAU ships no official inference prompt; this one is our choice. It asks for the *text* of a choice, not a letter,
    because the official scorer matches the choice text by word sets (a bare letter scores 2/1000).
    """
    lines = [question.strip(), *(choice.strip() for choice in choices)]
    lines.append("Answer with the exact text of one of the choices above.")
    return "\n".join(lines)


def _row_error(row: Mapping[str, Any], index: int, origin: str, problem: str) -> DataError:
    return DataError(f"MMAU item {row.get('id', '?')} (row {index} of {origin}): {problem}")


def validate_row(row: Any, index: int, origin: str, extra_keys: frozenset[str] = frozenset()) -> None:
    """Check one JSON object: the 11 keys (plus ``extra_keys``), types, answer among choices, known task/difficulty."""
    if not isinstance(row, Mapping):
        raise DataError(f"row {index} of {origin}: expected a JSON object, got {type(row).__name__}")
    keys = set(row)
    missing, unexpected = MMAU_KEYS - keys, keys - MMAU_KEYS - extra_keys
    if missing or unexpected:
        raise _row_error(row, index, origin, f"missing keys {sorted(missing)}, unexpected keys {sorted(unexpected)}")
    for key in ("id", "audio_id", "question", "answer", "task", "difficulty", "sub-category", "dataset"):
        if not isinstance(row[key], str) or (key == "id" and not row[key]):
            raise _row_error(row, index, origin, f"`{key}` must be a non-empty string")
    choices = row["choices"]
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise _row_error(row, index, origin, "`choices` must be a list of at least 2 strings")
    if row["answer"] not in choices:
        raise _row_error(row, index, origin, f"answer {row['answer']!r} is not one of the choices {choices}")
    if row["task"] not in MMAU_TASKS:
        raise _row_error(row, index, origin, f"unknown task {row['task']!r}; known: {MMAU_TASKS}")
    if row["difficulty"] not in MMAU_DIFFICULTIES:
        raise _row_error(row, index, origin, f"unknown difficulty {row['difficulty']!r}; known: {MMAU_DIFFICULTIES}")
    category = row["category"]
    if not (isinstance(category, str) or (isinstance(category, list) and all(isinstance(c, str) for c in category))):
        raise _row_error(row, index, origin, "`category` must be a string or a list of strings")


def read_rows(path: str | Path, *, extra_keys: frozenset[str] = frozenset(), jsonl: bool = False) -> list[dict]:
    """The validated rows of an MMAU-format file (a JSON list, or JSON Lines when ``jsonl``); ids must be unique."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"MMAU JSON not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        rows = [json.loads(line) for line in text.splitlines() if line.strip()] if jsonl else json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read MMAU file {path}: {err}") from err
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of items, got {type(rows).__name__}")
    seen: set[str] = set()
    for index, row in enumerate(rows):
        validate_row(row, index, str(path), extra_keys)
        if row["id"] in seen:
            raise _row_error(row, index, str(path), "duplicate id")
        seen.add(row["id"])
    return rows


def _category(raw: str | list[str]) -> str:
    # 13 sound items hold ["Reasoning"] instead of "Reasoning"; the scorer ignores the field, reports group by it.
    return raw if isinstance(raw, str) else ", ".join(raw)


def row_to_item(
    row: Mapping[str, Any], *, audio: AudioRef | None, id_prefix: str = "", speak: str | None = None
) -> Item:
    """A validated MMAU row -> Item: no text equivalent, the clip as audio, question + choices as the instruction."""
    return Item(
        id=f"{id_prefix}{row['id']}",
        subset=SUBSET,
        text=None,
        audio=audio,
        audio_instruction=mmau_prompt(row["question"], row["choices"]),
        choices=tuple(row["choices"]),  # duplicates kept: the scorer sees the raw list
        reference=row["answer"],  # stray spaces kept: the scorer tokenises
        meta={
            "task": row["task"],
            "difficulty": row["difficulty"],
            "sub-category": row["sub-category"],
            "dataset": row["dataset"],
            "category": _category(row["category"]),
            "category_raw": row["category"],
            "audio_id": row["audio_id"],
            "question": row["question"],
            "split": row["split"],
        },
        speak=speak,
    )


def audio_path(audio_dir: Path, audio_id: str) -> Path:
    """``./test-mini-audios/<id>.wav`` resolved by basename in ``audio_dir`` (or its ``test-mini-audios/``)."""
    name = PurePosixPath(audio_id).name
    direct = audio_dir / name
    nested = audio_dir / "test-mini-audios" / name
    return nested if not direct.exists() and nested.exists() else direct


def _audio_dir(options: LoadOptions) -> Path:
    if not options.mmau_audio_dir:
        raise DataError(
            f"MMAU audio is not included: download the clips (HF dataset {AUDIO_REPO}, folder test-mini-audios) "
            "and pass the folder holding the <id>.wav files with --mmau-audio-dir"
        )
    audio_dir = Path(options.mmau_audio_dir)
    if not audio_dir.is_dir():
        raise DataError(f"--mmau-audio-dir {audio_dir} is not a directory")
    return audio_dir


def _json_path(options: LoadOptions) -> Path:
    if not options.mmau_json:
        raise DataError("MMAU needs its test-mini JSON (Sakshi113/MMAU mmau-test-mini.json): pass --mmau-json PATH")
    return Path(options.mmau_json)


def load_mmau(request: SubsetRequest, options: LoadOptions) -> list[Item]:
    """Items of MMAU test-mini. A missing clip is not a load error: decoding it later records a per-item error."""
    rows = read_rows(_json_path(options))
    audio_dir = _audio_dir(options)
    rows = rows if options.limit is None else rows[: options.limit]
    return [row_to_item(row, audio=AudioRef(path=str(audio_path(audio_dir, row["audio_id"])))) for row in rows]


def describe_mmau(request: SubsetRequest, options: LoadOptions) -> dict[str, Any]:
    """Provenance: the JSON's sha256 and version name, and the audio folder."""
    return {**mmau_version(_json_path(options)), "audio_dir": options.mmau_audio_dir, "scorer": SCORER}


BENCHMARK = Benchmark(
    name="mmau",
    load=load_mmau,
    scorer={SUBSET: SCORER},
    describe=describe_mmau,
)
