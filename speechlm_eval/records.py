"""Per-item run records: append-only JSONL while a run goes, resumable after a kill, canonical order at the end.

A record is one JSON object per line: ``{"id", "subset", "arm", "response", "error", ...}``. Records are the source of
truth: every number in a report is derived from them plus the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

ARMS: tuple[str, ...] = ("text_llm_text", "speech_llm_text", "speech_llm_speech")


class RecordsError(ValueError):
    """A records file that cannot be read as records (other than a torn last line, which is repaired)."""


def read_records(path: str | Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """All complete records of a JSONL file, in file order.

    A final line without its newline is what a kill mid-write leaves: it is dropped (and cut from the file when
    ``repair``), so a resumed run recomputes that one item instead of crashing. A malformed line elsewhere is an error
    naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data) and repair:
        with open(path, "r+b") as handle:
            handle.truncate(complete_end)
    records = []
    for number, line in enumerate(data[:complete_end].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise RecordsError(f"{path}:{number}: not a JSON record ({error})") from error
        if not isinstance(record, dict) or "id" not in record:
            raise RecordsError(f"{path}:{number}: a record must be a JSON object with an 'id'")
        records.append(record)
    return records


class RecordWriter:
    """Appends records to a JSONL file, flushed and fsynced after each batch so a kill loses at most one batch."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.path, "a", encoding="utf-8")

    def write_many(self, records: Iterable[Mapping[str, Any]]) -> None:
        for record in records:
            self._handle.write(dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dumps(record: Mapping[str, Any]) -> str:
    """The one serialisation of a record (stable key order, unicode kept) so files compare byte for byte."""
    return json.dumps(record, ensure_ascii=False, sort_keys=True)


def write_canonical(path: str | Path, records: Iterable[Mapping[str, Any]], order: Sequence[str]) -> None:
    """Rewrite ``path`` atomically with one record per id (last one wins), sorted by the item order ``order``."""
    position = {item_id: i for i, item_id in enumerate(order)}
    unique: dict[str, Mapping[str, Any]] = {}
    for record in records:
        unique[record["id"]] = record
    ordered = sorted(unique.values(), key=lambda r: (position.get(r["id"], len(position)), r["id"]))
    write_text_atomic(Path(path), "".join(dumps(r) + "\n" for r in ordered))


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
