"""Evaluation suites: parse CLI specs such as ``voicebench:mmsu,sd-qa@usa mmau`` and load their items + provenance."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import Benchmark, DataError, LoadOptions, SubsetRequest, get_benchmark


def _check_subset(benchmark: Benchmark, subset: str, split: str | None) -> None:
    if subset in benchmark.unsupported:
        raise DataError(f"{benchmark.name}:{subset}: {benchmark.unsupported[subset]}")
    if subset not in benchmark.scorer:
        raise DataError(f"{benchmark.name} has no subset {subset!r}; valid: {', '.join(benchmark.subsets)}")
    if split is None:
        return
    valid = benchmark.splits.get(subset, ())
    if split not in valid:
        choices = f"valid: {', '.join(valid)}" if valid else "it takes no explicit split"
        raise DataError(f"{benchmark.name}:{subset} has no split {split!r}; {choices}")


def _parse_one(token: str) -> list[SubsetRequest]:
    name, has_subsets, rest = token.partition(":")
    benchmark = get_benchmark(name)
    if not has_subsets:
        return [SubsetRequest(name, subset) for subset in benchmark.default_subsets or benchmark.subsets]
    requests = []
    for part in rest.split(","):
        subset, has_split, split = part.strip().partition("@")
        if not subset or (has_split and not split):
            raise DataError(f"bad subset {part!r} in {token!r}; expected SUBSET or SUBSET@SPLIT")
        _check_subset(benchmark, subset, split if has_split else None)
        requests.append(SubsetRequest(name, subset, split if has_split else None))
    return requests


def parse_suite(spec: str) -> list[SubsetRequest]:
    """Requests for a suite spec: benchmarks separated by spaces or ';', each ``NAME`` or ``NAME:SUB[@SPLIT],...``.

    ``voicebench`` = its 9 leaderboard subsets at their default splits, ``bundled`` = every bundled subset,
    ``voicebench:sd-qa@usa`` names a split (``@all`` = every split). Unknown names raise :class:`DataError` listing
    the valid ones.
    """
    tokens = [token for token in re.split(r"[\s;]+", spec) if token]
    if not tokens:
        raise DataError("empty suite spec")
    return [request for token in tokens for request in _parse_one(token)]


def _source(benchmark: Benchmark, request: SubsetRequest, options: LoadOptions, items: list[Item]) -> dict[str, Any]:
    provenance = benchmark.describe(request, options) if benchmark.describe else {}
    return {
        "benchmark": request.benchmark,
        "subset": request.subset,
        "split": request.split,
        **provenance,
        "n": len(items),
        "n_by_split": dict(Counter(str(item.meta.get("split")) for item in items)),
    }


def load_suite(
    requests: list[SubsetRequest],
    *,
    data_dir: str | None = None,
    revision: str | None = None,
    mmau_json: str | None = None,
    mmau_audio_dir: str | None = None,
    limit: int | None = None,
) -> tuple[list[Item], list[dict[str, Any]]]:
    """Load every request (validating sources; audio is not decoded) and describe what was loaded.

    Returns:
        ``(items, sources)``: items in request order; ``sources`` is JSON-safe, one dict per request (benchmark,
        subset, split, revision or sha256, n, ...) for the run manifest.
    Raises:
        DataError: unknown names, bad sources, or an item id loaded twice.
    """
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of items per subset, got {limit}")
    options = LoadOptions(data_dir, revision, mmau_json, mmau_audio_dir, limit)
    items: list[Item] = []
    sources: list[dict[str, Any]] = []
    owner: dict[str, str] = {}
    for request in requests:
        benchmark = get_benchmark(request.benchmark)
        loaded = benchmark.load(request, options)
        loaded = loaded if limit is None else loaded[:limit]
        for item in loaded:
            if item.id in owner:
                raise DataError(f"item id {item.id!r} loaded twice (by {owner[item.id]} and {request.label()})")
            owner[item.id] = request.label()
        items.extend(loaded)
        sources.append(_source(benchmark, request, options, loaded))
    return items, sources
