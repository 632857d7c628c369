"""Benchmarks by name: a benchmark is one file (loader, subsets, scorers, provenance) plus one row in :data:`BENCHMARKS`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from speechlm_eval.data.item import Item
from speechlm_eval.registry import Registry

class DataError(ValueError):
    """A benchmark source cannot be used as asked (unknown name, missing column, bad row, missing files)."""


@dataclass(frozen=True)
class SubsetRequest:
    """One subset of one benchmark, optionally one explicit split (``None`` = the benchmark's default split(s))."""

    benchmark: str
    subset: str
    split: str | None = None

    def label(self) -> str:
        """The CLI spelling, e.g. ``"voicebench:sd-qa@usa"``."""
        return f"{self.benchmark}:{self.subset}" + (f"@{self.split}" if self.split else "")


@dataclass(frozen=True)
class LoadOptions:
    """Where the data lives; shared by every loader (each one reads the fields it needs).

    Attributes:
        data_dir: a local copy of VoiceBench (``save_to_disk`` or the hub's parquet snapshot); ``None`` = the HF hub.
        revision: the HF dataset revision to load (default: the hub's current main; nothing is pinned).
        mmau_json: path of MMAU's ``mmau-test-mini.json``.
        mmau_audio_dir: folder with MMAU's ``<id>.wav`` clips.
        limit: keep only the first N items of each requested subset.
    """

    data_dir: str | None = None
    revision: str | None = None
    mmau_json: str | None = None
    mmau_audio_dir: str | None = None
    limit: int | None = None


LoadFn = Callable[[SubsetRequest, LoadOptions], list[Item]]
# Provenance of a request for the run manifest (revision or sha256, files, resolved splits); JSON-safe.
DescribeFn = Callable[[SubsetRequest, LoadOptions], dict[str, Any]]


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark.

    Attributes:
        name: registry key (``"voicebench"``, ``"mmau"``, ``"bundled"``).
        load: ``(request, options) -> items``; validates the source and raises :class:`DataError` before any model
            is needed. Audio is *not* decoded here (a bad clip is a per-item error later).
        scorer: subset -> scorer name (see ``speechlm_eval.scoring.registry``); its keys are the valid subsets.
        default_subsets: what the bare benchmark name means (empty = every subset).
        splits: subset -> splits a user may name with ``@split``; a subset absent here takes no explicit split.
        unsupported: subset -> why it cannot be run (named in the error when someone asks for it).
        describe: provenance for the manifest; ``None`` = nothing beyond the request.
    """

    name: str
    load: LoadFn
    scorer: Mapping[str, str]
    default_subsets: tuple[str, ...] = ()
    splits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unsupported: Mapping[str, str] = field(default_factory=dict)
    describe: DescribeFn | None = None

    @property
    def subsets(self) -> tuple[str, ...]:
        return tuple(self.scorer)

    def scorer_for(self, subset: str) -> str:
        """The scorer name of ``subset``; :class:`DataError` listing the subsets otherwise."""
        try:
            return self.scorer[subset]
        except KeyError:
            raise DataError(f"{self.name} has no subset {subset!r}; valid: {', '.join(self.subsets)}") from None


def _unknown(name: str, known: list[str]) -> DataError:
    return DataError(f"unknown benchmark {name!r}; registered: {', '.join(known)}")


# A benchmark is one file defining ``BENCHMARK`` plus one row here; each is imported when first asked for.
BENCHMARKS: Registry[Benchmark] = Registry(
    "benchmark",
    {
        "bundled": "speechlm_eval.data.bundled:BENCHMARK",
        "mmau": "speechlm_eval.data.mmau:BENCHMARK",
        "organism": "speechlm_eval.data.organism:BENCHMARK",
        "voicebench": "speechlm_eval.data.voicebench:BENCHMARK",
    },
    unknown=_unknown,
)


def register_benchmark(benchmark: Benchmark) -> Benchmark:
    """Add (or replace) a benchmark object at run time (a plug-in may instead add a ``"module:BENCHMARK"`` row)."""
    BENCHMARKS.register(benchmark.name, benchmark, replace=True)
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    """The benchmark registered as ``name``; :class:`DataError` listing the known names otherwise."""
    return BENCHMARKS.get(name)


def benchmark_names() -> list[str]:
    return BENCHMARKS.names()


def scorer_for_subset(subset: str) -> str:
    """The scorer name an item of ``subset`` is scored with, across all benchmarks (subset names agree across them)."""
    names = {b.scorer[subset] for b in (get_benchmark(n) for n in benchmark_names()) if subset in b.scorer}
    if len(names) != 1:
        problem = "is unknown" if not names else f"maps to several scorers {sorted(names)}"
        raise DataError(f"subset {subset!r} {problem}")
    return names.pop()
