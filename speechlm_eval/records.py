"""Per-item run records: append-only JSONL while a run goes, resumable after a kill, canonical order at the end.

A record is one JSON object per line: ``{"id", "subset", "arm", "response", "error", ...}``. Records are the source of
truth: every number in a report is derived from them plus the manifest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

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


def write_atomic(path: str | Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers, and a kill or power cut at any moment, see either the old file
    or the whole new one: a unique temp file in the same directory, fsynced, renamed over ``path``, directory fsynced.

    ``durable=False`` skips the two fsyncs (readers still never see a partial file): for cache entries that are
    checked when read and recomputed when torn, where a sync per entry would cost more than a recomputation.
    A crash between the write and the rename leaves a ``.<name>.*.tmp`` file, which :func:`remove_stale_temps` clears.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; outputs are meant to be readable like any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem allows opening a directory, and then there is nothing to do.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temp files a kill between a write and its rename left in ``directory`` (not recursive)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_atomic` for text (UTF-8)."""
    write_atomic(path, text)


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON data: non-finite floats become None (strict JSON), numpy scalars and arrays become
    Python numbers and lists, tuples and sets lists, dataclasses dicts; recursing into dicts and lists."""
    if isinstance(value, bool) or value is None or isinstance(value, (str, int)):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple, dict)):  # numpy scalars and arrays
        return json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {key: json_safe(v) for key, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_safe(dataclasses.asdict(value))
    if isinstance(value, Path):
        return str(value)
    return value


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """The one way a JSON file (manifest, results) is written: sorted keys, indent 2, strict JSON, atomic."""
    write_atomic(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n")
