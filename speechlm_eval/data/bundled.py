"""The bundled mini-suite: a few short text items per VoiceBench subset plus MMAU-style speech items, shipped with the
package so a run works offline; audio is synthesised on demand from ``Item.text_to_speak()``."""

from __future__ import annotations

import hashlib
import json
from importlib import resources
from typing import Any

from speechlm_eval.data import mmau, voicebench
from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import Benchmark, DataError, LoadOptions, SubsetRequest

ID_PREFIX = "bundled/"
_PACKAGE_DIR = "bundled_suite"
# Bundled rows are in VoiceBench's columns (or MMAU's keys + `speak`), so they go through the same row -> Item code.
VOICEBENCH_FORMAT = (
    "openbookqa", "mmsu", "bbh", "advbench", "ifeval", "alpacaeval_full", "commoneval", "wildvoice", "sd-qa",
)  # fmt: skip
MMAU_FORMAT = ("mmau",)
SUBSETS: tuple[str, ...] = VOICEBENCH_FORMAT + MMAU_FORMAT
# The split recorded in ids/meta: the one VoiceBench's leaderboard uses for that subset.
_SPLITS = {"sd-qa": "usa"}


def _file(subset: str) -> Any:
    return resources.files("speechlm_eval.data").joinpath(_PACKAGE_DIR, f"{subset}.jsonl")


def _rows(subset: str) -> tuple[list[dict[str, Any]], str]:
    """The JSON Lines rows of a bundled subset and the file's sha256."""
    data = _file(subset).read_bytes()
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return rows, hashlib.sha256(data).hexdigest()


def _voicebench_items(subset: str) -> list[Item]:
    rows, _ = _rows(subset)
    split = _SPLITS.get(subset, "test")
    origin = f"bundled {subset}.jsonl"
    voicebench.check_columns(rows[0].keys(), subset=subset, split=split, origin=origin, need_audio=False)
    return [
        voicebench.row_to_item(row, subset=subset, split=split, index=i, origin=origin, id_prefix=ID_PREFIX)
        for i, row in enumerate(rows)
    ]


def _mmau_items(subset: str) -> list[Item]:
    with resources.as_file(_file(subset)) as path:
        rows = mmau.read_rows(path, extra_keys=frozenset({"speak"}), jsonl=True)
    return [mmau.row_to_item(row, audio=None, id_prefix=ID_PREFIX, speak=row["speak"]) for row in rows]


def load_bundled(request: SubsetRequest, options: LoadOptions) -> list[Item]:
    """Items of one bundled subset (no audio: the speech arm synthesises it)."""
    if request.subset not in SUBSETS:
        raise DataError(f"no bundled subset {request.subset!r}; valid: {', '.join(SUBSETS)}")
    if request.split is not None:
        raise DataError(f"bundled subsets have a single split; drop '@{request.split}'")
    items = _mmau_items(request.subset) if request.subset in MMAU_FORMAT else _voicebench_items(request.subset)
    return items if options.limit is None else items[: options.limit]


def describe_bundled(request: SubsetRequest, options: LoadOptions) -> dict[str, Any]:
    """Provenance: the bundled file and its sha256."""
    _, sha = _rows(request.subset)
    return {"file": f"{_PACKAGE_DIR}/{request.subset}.jsonl", "sha256": sha, "scorer": _scorer(request.subset)}


def _scorer(subset: str) -> str:
    return mmau.SCORER if subset in MMAU_FORMAT else voicebench.SUBSETS[subset].scorer


BENCHMARK = Benchmark(
    name="bundled",
    load=load_bundled,
    scorer={subset: _scorer(subset) for subset in SUBSETS},
    describe=describe_bundled,
)
