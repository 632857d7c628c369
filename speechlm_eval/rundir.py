"""The run directory, typed: the product's log, and the one reader/writer of everything a gap run leaves on disk.

Layout (every number in a report derives from these files)::

    manifest.json                 Manifest: the request, models, data provenance, settings, package versions
    items.jsonl                   one ItemRow per item (no audio)
    records/<arm>.jsonl           one record per item and arm (records/<arm>.rank<k>.jsonl while k processes run)
    records/diagnostics.jsonl     the judge-free distribution diagnostics, records/perception.jsonl the probe
    records/parity.jsonl          served vs in-process answers of the first K items (gap --parity-check)
    judgements/<arm>.jsonl        LLM-judge outputs for the judge-scored subsets, keyed by the judged response
    lmeval/<arm>.jsonl            lm-eval per-document records (and <arm>.results.json, lm-eval's own summary)
    scores.jsonl                  per item: question, reference, each arm's response, score, parsed flag, extracted
                                  answer, and the item's contribution to each gap ("which items flipped")
    usage.jsonl                   served endpoints' calls, retries and tokens (one line per endpoint, process, session)
    results.json, report.md, report.html, plots/    rebuilt from the files above by ``speechlm-eval report``

Arms and gaps are defined here once, as data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, NamedTuple, Sequence

from speechlm_eval import __version__
from speechlm_eval.records import dumps, json_safe, read_records, write_canonical, write_json_atomic, write_text_atomic

# ---------------------------------------------------------------------------------------------------- arms and gaps


@dataclass(frozen=True)
class Arm:
    """One way of answering an item: which model answers, and whether it hears the audio or reads the text."""

    name: str
    model: Literal["text_llm", "speech_llm"]
    audio: bool
    title: str


ARM_LIST: tuple[Arm, ...] = (
    Arm("text_llm_text", "text_llm", audio=False, title="text LLM · text"),
    Arm("speech_llm_text", "speech_llm", audio=False, title="speech LLM · text"),
    Arm("speech_llm_speech", "speech_llm", audio=True, title="speech LLM · speech"),
)
ARMS: tuple[str, ...] = tuple(arm.name for arm in ARM_LIST)
TEXT_LLM_TEXT, SPEECH_LLM_TEXT, SPEECH_LLM_SPEECH = ARMS
ARM_BY_NAME: dict[str, Arm] = {arm.name: arm for arm in ARM_LIST}
ARM_TITLES: dict[str, str] = {arm.name: arm.title for arm in ARM_LIST}
SPEECH_ARM = SPEECH_LLM_SPEECH  # the only arm of items without a text equivalent (MMAU)


class Gap(NamedTuple):
    """A paired gap: ``first - second`` per item (positive = the second arm answers worse)."""

    first: str
    second: str


GAPS: dict[str, Gap] = {
    "forgetting": Gap(TEXT_LLM_TEXT, SPEECH_LLM_TEXT),
    "inequivalence": Gap(SPEECH_LLM_TEXT, SPEECH_LLM_SPEECH),
}
# "forgetting = text LLM · text − speech LLM · text; inequivalence = speech LLM · text − speech LLM · speech"
GAP_DEFINITIONS: str = "; ".join(f"{name} = {ARM_TITLES[gap.first]} − {ARM_TITLES[gap.second]}"
                                 for name, gap in GAPS.items())
# lm-eval tasks (lmeval/<arm>.jsonl): the two text arms on lm-eval's own prompts, and two log-likelihood arms that
# score a multiple-choice task given the typed vs the spoken question (speechlm_eval.lmeval.spoken).
LMEVAL_SPOKEN_ARMS: tuple[str, str] = ("speech_llm_text_ll", "speech_llm_speech_ll")
LMEVAL_GAPS: dict[str, Gap] = {
    "forgetting": GAPS["forgetting"],
    "inequivalence": Gap(*LMEVAL_SPOKEN_ARMS),
}
# Record streams beside the arms (records/<name>.jsonl).
DIAGNOSTICS = "diagnostics"
PERCEPTION = "perception"
PARITY = "parity"  # served vs in-process answers of the same items (gap --parity-check)

# -------------------------------------------------------------------------------------------------------- item rows


@dataclass(frozen=True)
class ItemRow:
    """What scoring and reports need of an item (no audio): one line of ``items.jsonl``, and the view scorers take.

    ``judgements`` maps the sha256 of a judged response to the judge's outputs for it (judge-scored subsets only);
    it is read from ``judgements/`` and never written to ``items.jsonl``.
    """

    id: str
    subset: str
    scorer: str | None
    text: str | None
    audio_instruction: str | None = None
    speak: str | None = None
    choices: tuple[str, ...] = ()
    reference: Any = None
    meta: Mapping[str, Any] = field(default_factory=dict)
    has_audio: bool = False
    judgements: Mapping[str, list[str]] = field(default_factory=dict)

    @property
    def has_text_equivalent(self) -> bool:
        """True when the item can be asked as text, i.e. the text arms apply."""
        return self.text is not None and self.audio_instruction is None

    @classmethod
    def from_item(cls, item: Any, scorer: str | None = None) -> "ItemRow":
        """The row of a :class:`speechlm_eval.data.item.Item` (or of any object with its attributes)."""
        return cls(id=item.id, subset=item.subset, scorer=scorer, text=item.text,
                   audio_instruction=getattr(item, "audio_instruction", None), speak=getattr(item, "speak", None),
                   choices=tuple(getattr(item, "choices", ())), reference=getattr(item, "reference", None),
                   meta=dict(getattr(item, "meta", {}) or {}), has_audio=getattr(item, "audio", None) is not None,
                   judgements=dict(getattr(item, "judgements", {}) or {}))

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> "ItemRow":
        return cls(id=row["id"], subset=row["subset"], scorer=row.get("scorer"), text=row.get("text"),
                   audio_instruction=row.get("audio_instruction"), speak=row.get("speak"),
                   choices=tuple(row.get("choices") or ()), reference=row.get("reference"),
                   meta=row.get("meta") or {}, has_audio=bool(row.get("has_audio", False)))

    def to_json(self) -> dict[str, Any]:
        """The ``items.jsonl`` object (judgements excluded)."""
        return {"id": self.id, "subset": self.subset, "scorer": self.scorer, "text": self.text,
                "audio_instruction": self.audio_instruction, "speak": self.speak, "choices": list(self.choices),
                "reference": self.reference, "meta": dict(self.meta), "has_audio": self.has_audio}

    def with_judgements(self, judgements: Mapping[str, list[str]]) -> "ItemRow":
        return dataclasses.replace(self, judgements=dict(judgements))


def items_jsonl(rows: Iterable[ItemRow]) -> str:
    """The canonical text of ``items.jsonl`` (sorted keys, unicode kept): its sha256 identifies the item set."""
    return "".join(json.dumps(json_safe(r.to_json()), ensure_ascii=False, sort_keys=True, default=str) + "\n"
                   for r in rows)


def items_jsonl_sha256(rows: Iterable[ItemRow]) -> str:
    return hashlib.sha256(items_jsonl(rows).encode()).hexdigest()


_PACKAGE_ROOT = Path(__file__).resolve().parent


def portable_path(value: str | None, run_dir: str | Path) -> str | None:
    """How a local path is written into a run's files, so that a run directory holds no machine's absolute paths:
    package data as ``speechlm_eval/...``, a path beside the run (under the run directory's parent) relative to the
    run directory (``../checkpoint``), anything else (a hub id, a path elsewhere) as given."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if not path.exists():
        return value
    resolved, run = path.resolve(), Path(run_dir).resolve()
    if resolved.is_relative_to(_PACKAGE_ROOT):
        return (Path(_PACKAGE_ROOT.name) / resolved.relative_to(_PACKAGE_ROOT)).as_posix()
    if resolved.is_relative_to(run.parent):
        return Path(os.path.relpath(resolved, run)).as_posix()
    return value


# --------------------------------------------------------------------------------------------------------- manifest

MANIFEST_SCHEMA = "speechlm-eval/manifest/v1"
RECORDED_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "numpy", "scipy", "soundfile", "soxr")


@dataclass
class Manifest:
    """``manifest.json`` of a gap run. Keys it does not know (a newer version's) are kept in ``extra``."""

    request: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)
    data: list[dict[str, Any]] = field(default_factory=list)
    items: dict[str, Any] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)
    tts: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 8
    world_size: int = 1
    threads: int | None = None
    seed: int = 0
    statistics: dict[str, Any] = field(default_factory=lambda: {"n_resamples": 10_000, "confidence": 0.95})
    packages: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    judge: dict[str, Any] | None = None
    schema: str = MANIFEST_SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_resamples(self) -> int:
        return int(self.statistics.get("n_resamples", 10_000))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("request", {})
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        if out["judge"] is None:
            del out["judge"]
        return {**self.extra, **out}


def package_versions(packages: Sequence[str] = RECORDED_PACKAGES) -> dict[str, str]:
    """Python, speechlm-eval and each named package's installed version (``not installed`` when absent)."""
    versions = {"python": platform.python_version(), "speechlm_eval": __version__}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunDirError(ValueError):
    """A directory that cannot be used as asked (another run in it, a resume that does not match)."""


def prepare_output_dir(path: str | Path, request: Mapping[str, Any], *, previous: Mapping[str, Any] | None,
                       has_run: bool, outputs: Sequence[str], resume: bool, overwrite: bool, what: str = "run",
                       key: str = "request", ignore: Iterable[str] = ()) -> None:
    """Refuse to mix runs: an existing run continues only with ``resume`` and the same ``request``.

    ``previous``: the request recorded by the existing run (``None`` when it recorded none yet); ``outputs``: what
    ``overwrite`` deletes; ``ignore``: request keys that may change on resume. Used by gap and distill alike.
    """
    out = Path(path)
    if has_run and overwrite:
        for name in outputs:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif has_run and not resume:
        raise RunDirError(f"{out} already holds a {what}; pass --resume to continue it or --overwrite to start over")
    elif has_run and previous is not None:
        skip = set(ignore)
        changed = sorted(k for k in set(previous) | set(request)
                         if k not in skip and previous.get(k) != request.get(k))
        if changed:
            raise RunDirError(f"cannot resume {out}: the {key} differs from the run's in {', '.join(changed)}")


# -------------------------------------------------------------------------------------------------------- run dir

RUN_OUTPUTS = ("records", "judgements", "lmeval", "items.jsonl", "manifest.json", "results.json", "scores.jsonl",
               "report.md", "report.html", "plots", "usage.jsonl", "usage.jsonl.lock")


class RunDir:
    """A gap run directory: typed access to its manifest, items, records, judgements and lm-eval records."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # -- paths
    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def items_path(self) -> Path:
        return self.path / "items.jsonl"

    @property
    def records_dir(self) -> Path:
        return self.path / "records"

    @property
    def judgements_dir(self) -> Path:
        return self.path / "judgements"

    @property
    def lmeval_dir(self) -> Path:
        return self.path / "lmeval"

    @property
    def usage_path(self) -> Path:
        return self.path / "usage.jsonl"

    def records_path(self, stream: str, rank: int = 0, world_size: int = 1) -> Path:
        """``records/<stream>.jsonl``, or this rank's file while several processes write."""
        suffix = f".rank{rank}" if world_size > 1 else ""
        return self.records_dir / f"{stream}{suffix}.jsonl"

    def stream_files(self, stream: str) -> list[Path]:
        """The merged file and any per-rank files of a record stream, sorted."""
        return sorted([*self.records_dir.glob(f"{stream}.jsonl"), *self.records_dir.glob(f"{stream}.rank*.jsonl")])

    # -- state
    def exists(self) -> bool:
        """True when a run was started here (a manifest or any records)."""
        return self.manifest_path.exists() or any(self.records_dir.glob("*.jsonl"))

    def prepare(self, request: Mapping[str, Any], *, resume: bool, overwrite: bool) -> None:
        """Refuse to mix runs (see :func:`prepare_output_dir`); deletes the previous run with ``overwrite``."""
        previous = self.read_manifest().request if self.manifest_path.exists() else None
        prepare_output_dir(self.path, request, previous=previous, has_run=self.exists(), outputs=RUN_OUTPUTS,
                           resume=resume, overwrite=overwrite)

    @property
    def results_path(self) -> Path:
        return self.path / "results.json"

    @property
    def scores_path(self) -> Path:
        return self.path / "scores.jsonl"

    def write_scores(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """``scores.jsonl``: one line per item, in item order (derived from the records; rebuilt by ``report``)."""
        write_text_atomic(self.scores_path, "".join(dumps(r) + "\n" for r in rows))

    def scores(self) -> list[dict[str, Any]]:
        """The rows of ``scores.jsonl`` ([] before a report was built)."""
        return read_records(self.scores_path) if self.scores_path.exists() else []

    def read_results(self) -> dict[str, Any]:
        """``results.json`` as written by the report builder (``speechlm-eval report`` rebuilds it)."""
        return json.loads(self.results_path.read_text(encoding="utf-8"))

    # -- manifest
    def read_manifest(self) -> Manifest:
        return Manifest.from_dict(json.loads(self.manifest_path.read_text(encoding="utf-8")))

    @property
    def manifest(self) -> Manifest:
        return self.read_manifest()

    def write_manifest(self, manifest: Manifest) -> None:
        write_json_atomic(self.manifest_path, manifest.to_dict())

    # -- items
    def write_items(self, rows: Sequence[ItemRow]) -> str:
        """Write ``items.jsonl``; returns its sha256."""
        text = items_jsonl(rows)
        write_text_atomic(self.items_path, text)
        return hashlib.sha256(text.encode()).hexdigest()

    def items(self, *, with_judgements: bool = True) -> list[ItemRow]:
        """The item rows in run order, each with its judge outputs folded in (``judgements/``)."""
        rows = [ItemRow.from_json(r) for r in read_records(self.items_path)]
        if not with_judgements:
            return rows
        judged = self.judgements()
        if not judged:
            return rows
        return [r.with_judgements({j["response_sha256"]: list(j["outputs"]) for j in judged.get(r.id, [])})
                for r in rows]

    def judgements(self) -> dict[str, list[dict[str, Any]]]:
        """``{item id: [judgement rows of every arm]}`` (rows: ``id``, ``response_sha256``, ``judge``, ``outputs``)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for path in sorted(self.judgements_dir.glob("*.jsonl")):
            for row in read_records(path):
                out.setdefault(row["id"], []).append(row)
        return out

    def write_judgements(self, arm: str, rows: Iterable[Mapping[str, Any]], order: Sequence[str]) -> None:
        write_canonical(self.judgements_dir / f"{arm}.jsonl", rows, order)

    # -- records
    def records(self, stream: str) -> dict[str, dict[str, Any]]:
        """``{item id: record}`` of a merged record stream (an arm, ``diagnostics`` or ``perception``); {} if none."""
        path = self.records_path(stream)
        return {r["id"]: r for r in read_records(path)} if path.exists() else {}

    def arm_records(self) -> dict[str, dict[str, dict[str, Any]]]:
        """``{arm: {item id: record}}`` for every arm with a merged records file, in :data:`ARMS` order."""
        return {arm: self.records(arm) for arm in ARMS if self.records_path(arm).exists()}

    def stream_records(self, stream: str) -> dict[str, dict[str, Any]]:
        """``{item id: record}`` from the stream's merged file and every rank's file (before the stream is merged)."""
        found: dict[str, dict[str, Any]] = {}
        for path in self.stream_files(stream):
            found.update((r["id"], r) for r in read_records(path, repair=True))
        return found

    def completed_ids(self, stream: str) -> set[str]:
        """Ids with a record in the stream's merged file or in any rank's file (a killed multi-process run)."""
        done: set[str] = set()
        for path in self.stream_files(stream):
            done.update(r["id"] for r in read_records(path, repair=True))
        return done

    def merge(self, streams: Iterable[str], order: Sequence[str]) -> None:
        """Fold every rank's records of each stream into ``records/<stream>.jsonl`` in item order (one process, after
        a barrier): the merged file is written durably before the per-rank files are deleted."""
        for stream in streams:
            paths = self.stream_files(stream)
            if not paths:
                continue
            records = [r for p in paths for r in read_records(p, repair=True)]
            merged = self.records_path(stream)
            write_canonical(merged, records, order)
            for path in paths:
                if path != merged:
                    path.unlink()

    def lmeval_records(self) -> dict[str, list[dict[str, Any]]]:
        """``{arm: [records]}`` of the lm-eval records under ``lmeval/`` (file stem = arm), sorted by arm name."""
        return {path.stem: read_records(path) for path in sorted(self.lmeval_dir.glob("*.jsonl"))}

    # -- endpoint usage
    def append_usage(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append usage rows (``role``, ``model``, ``endpoint``, counts, ``cost_usd``), one per endpoint and process.

        Appended, never rewritten: a resumed or sharded run adds its own lines, and the report sums them, so what
        every session spent stays counted. A lock keeps lines of concurrent processes whole.
        """
        from filelock import FileLock

        from speechlm_eval.records import dumps

        lines = "".join(dumps(json_safe({"id": r.get("role", "endpoint"), **r})) + "\n" for r in rows)
        if not lines:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.usage_path) + ".lock"):
            with open(self.usage_path, "a", encoding="utf-8") as handle:
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())

    def usage_rows(self) -> list[dict[str, Any]]:
        """Every usage row appended so far (``[]`` for a run that called no endpoint)."""
        return read_records(self.usage_path) if self.usage_path.exists() else []
