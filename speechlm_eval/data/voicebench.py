"""VoiceBench (HF dataset ``hlt-lab/voicebench``): the one place for its subsets, splits, sizes and scorers; its loader.

Rows come from the hub, a ``save_to_disk`` copy or a parquet snapshot of the hub repo; audio stays encoded here
(``Audio(decode=False)``) and is decoded per item by :func:`speechlm_eval.data.audio.decode_audio`. Items do not
hold their clips: each keeps its duration (read from the header at load, to sort batches) and a deferred read of its
row's audio cell, made when its batch runs, so a run's memory does not grow with its items.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import glob
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from speechlm_eval.data.item import AudioRef, Item
from speechlm_eval.data.registry import Benchmark, DataError, LoadOptions, SubsetRequest

log = logging.getLogger(__name__)

REPO_ID = "hlt-lab/voicebench"

# !!! NOT PINNED !!! No full commit hash of hlt-lab/voicebench whose tree holds every subset we load (bbh was
# re-uploaded in 2025 and wildvoice added after it) could be verified from public pages. Runs therefore load `main`,
# which can change under you: pass `--revision <commit>` to pin, and the manifest records REVISION_NOTE.
# Verified full hashes seen (all predate bbh/wildvoice, so unusable for the leaderboard suite):
#   aaa46d405d681aeb220047d3e8be782094b4cd31 (55 commits: no bbh, no wildvoice)
#   3404500b6019b36e0908901eb1c14462a19e5763, d312abe20ee87a714e9454147ffb0b8603e80739 (Oct 2024, few subsets)
VOICEBENCH_REVISION: str | None = None
REVISION_NOTE = (
    "hlt-lab/voicebench is NOT revision-pinned by speechlm-eval (no verified commit hash containing bbh and "
    "wildvoice was found); data was loaded from the hub's current `main` unless --voicebench-revision was given. "
    "Upstream VoiceBench code does not pin it either, and bbh was re-uploaded in 2025."
)


@dataclass(frozen=True)
class SubsetInfo:
    """One VoiceBench subset.

    Attributes:
        splits: split -> number of rows (the hlt-lab/voicebench dataset card).
        scorer: the official evaluator's name (``open``, ``qa``, ``mcq``, ``bbh``, ``ifeval``, ``harm``).
        default_splits: what a request without ``@split`` loads (pooled in this order).
        leaderboard: whether the subset is one of the 9 columns of the leaderboard's Overall score.
    """

    splits: Mapping[str, int]
    scorer: str
    default_splits: tuple[str, ...]
    leaderboard: bool


_SD_QA_SPLITS = ("aus", "gbr", "ind_n", "ind_s", "irl", "kenya", "nga", "nzl", "phl", "usa", "zaf")
_SPEAKER_SPLITS = (
    "en_AU_Wavenet_A_1.0_0.0_0.0", "en_AU_Wavenet_B_1.0_0.0_0.0",
    "en_GB_Wavenet_A_1.0_0.0_0.0", "en_GB_Wavenet_B_1.0_0.0_0.0",
    "en_IN_Wavenet_A_1.0_0.0_0.0", "en_IN_Wavenet_B_1.0_0.0_0.0",
    "en_US_Wavenet_A_0.5_0.0_0.0", "en_US_Wavenet_A_1.0_0.0_0.0", "en_US_Wavenet_A_1.5_0.0_0.0",
    "en_US_Wavenet_A_2.0_0.0_0.0", "en_US_Wavenet_C_1.0_0.0_0.0",
)  # fmt: skip
_MMSU_SPLITS = {
    "law": 51, "engineering": 107, "other": 546, "biology": 172, "business": 236, "economics": 280,
    "health": 406, "philosophy": 305, "psychology": 317, "history": 104, "chemistry": 167, "physics": 383,
}  # fmt: skip


def _single(n: int) -> dict[str, int]:
    return {"test": n}


# Leaderboard subsets first, in the order of the Overall score (VoiceBench leaderboard).
SUBSETS: dict[str, SubsetInfo] = {
    "alpacaeval_full": SubsetInfo(_single(636), "open", ("test",), True),
    "commoneval": SubsetInfo(_single(200), "open", ("test",), True),
    "wildvoice": SubsetInfo(_single(1000), "open", ("test",), True),
    # The leaderboard's SD-QA column is the `usa` accent split (issues #20, #29).
    "sd-qa": SubsetInfo(dict.fromkeys(_SD_QA_SPLITS, 553), "qa", ("usa",), True),
    # MMSU's 12 domains are pooled into one subset (micro-average over 3,074 items; upstream does not say).
    "mmsu": SubsetInfo(dict(_MMSU_SPLITS), "mcq", tuple(_MMSU_SPLITS), True),
    "openbookqa": SubsetInfo(_single(455), "mcq", ("test",), True),
    "bbh": SubsetInfo(_single(1000), "bbh", ("test",), True),
    "ifeval": SubsetInfo(_single(345), "ifeval", ("test",), True),
    "advbench": SubsetInfo(_single(520), "harm", ("test",), True),
    "alpacaeval": SubsetInfo(_single(199), "open", ("test",), False),
    # Speaker/speed robustness study: all 11 voices pooled.
    "alpacaeval_speaker": SubsetInfo(dict.fromkeys(_SPEAKER_SPLITS, 636), "open", _SPEAKER_SPLITS, False),
}
LEADERBOARD_SUBSETS: tuple[str, ...] = tuple(name for name, info in SUBSETS.items() if info.leaderboard)
UNSUPPORTED: dict[str, str] = {
    "mtbench": "mtbench is multi-turn (columns audio1/audio2, no `audio` column) and VoiceBench has no evaluator "
    "for it; it is not supported",
}
# Name accepted after '@' to load every split of a subset.
ALL_SPLITS = "all"

# Columns each official evaluator reads besides `prompt` (and `audio` for the speech arm).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "open": (),
    "harm": (),
    "qa": ("reference",),
    "mcq": ("reference",),
    "bbh": ("reference", "id"),
    "ifeval": ("instruction_id_list", "kwargs"),
}
_ITEM_FIELDS = ("audio", "prompt", "reference")  # columns that become Item fields; every other one goes to meta


def subset_info(subset: str) -> SubsetInfo:
    """The table entry of ``subset``; :class:`DataError` for mtbench or an unknown name."""
    if subset in UNSUPPORTED:
        raise DataError(UNSUPPORTED[subset])
    try:
        return SUBSETS[subset]
    except KeyError:
        raise DataError(f"unknown VoiceBench subset {subset!r}; valid: {', '.join(SUBSETS)}") from None


def resolve_splits(subset: str, split: str | None) -> tuple[str, ...]:
    """The splits a request loads: the defaults, every split (``"all"``), or the named one (checked)."""
    info = subset_info(subset)
    if split is None:
        return info.default_splits
    if split == ALL_SPLITS:
        return tuple(info.splits)
    if split not in info.splits:
        raise DataError(
            f"VoiceBench subset {subset!r} has no split {split!r}; valid: {', '.join(info.splits)} (or {ALL_SPLITS})"
        )
    return (split,)


# --------------------------------------------------------------------------------------------------- rows -> Items


def check_columns(columns: Iterable[str], *, subset: str, split: str, origin: str, need_audio: bool = True) -> None:
    """Fail early, naming subset/split/origin, when a column the subset's scorer (or the speech arm) needs is absent."""
    present = set(columns)
    needed = ["prompt", *REQUIRED_COLUMNS[subset_info(subset).scorer]] + (["audio"] if need_audio else [])
    missing = [c for c in needed if c not in present]
    if missing:
        raise DataError(
            f"VoiceBench {subset}/{split} ({origin}): missing column(s) {', '.join(missing)}; "
            f"found: {', '.join(sorted(present))}"
        )


def _audio_ref(value: Any) -> AudioRef:
    """The undecoded ``audio`` cell (``{"bytes", "path"}``) as an AudioRef; an empty one fails later, per item."""
    if isinstance(value, Mapping):
        return AudioRef(data=value.get("bytes"), path=value.get("path"))
    if isinstance(value, (bytes, bytearray)):
        return AudioRef(data=bytes(value))
    if isinstance(value, str):
        return AudioRef(path=value)
    return AudioRef()


def row_to_item(
    row: Mapping[str, Any], *, subset: str, split: str, index: int, origin: str, id_prefix: str = ""
) -> Item:
    """One VoiceBench-format row -> Item ``{id_prefix}{subset}/{split}/{index}``; other columns go to ``meta``.

    Rows without an ``audio`` column (the bundled suite) get ``audio=None``: their audio is synthesised from ``text``.
    """
    item_id = f"{id_prefix}{subset}/{split}/{index}"
    text = row.get("prompt")
    if not isinstance(text, str):
        raise DataError(f"{item_id} ({origin}): `prompt` must be a string, got {type(text).__name__}")
    for column in REQUIRED_COLUMNS[subset_info(subset).scorer]:
        if row.get(column) is None:
            raise DataError(f"{item_id} ({origin}): column `{column}` is empty; the {subset} scorer needs it")
    meta = {key: value for key, value in row.items() if key not in _ITEM_FIELDS}
    meta["split"] = split
    return Item(
        id=item_id,
        subset=subset,
        text=text,
        audio=_audio_ref(row["audio"]) if "audio" in row else None,
        reference=row.get("reference"),
        meta=meta,
    )


# ---------------------------------------------------------------------------------------------- row sources


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split, opened but not read: column names, a row reader, and where they come from."""

    columns: tuple[str, ...]
    read: Callable[[int | None], Iterator[dict[str, Any]]]  # limit -> rows
    origin: str
    layout: str
    audio_at: Callable[[int], Any] | None = None  # row index -> that row's audio cell, read again from the source


def deferred_audio(rows: SplitRows, index: int, cell: Any) -> AudioRef:
    """The row's audio as a deferred read of ``rows.audio_at(index)``, with the duration of ``cell`` (the cell read
    now, then dropped); the eager cell itself when the source has no random access."""
    from speechlm_eval.data.audio import clip_seconds

    eager = _audio_ref(cell)
    if rows.audio_at is None:
        return eager
    origin = f"{rows.origin} row {index}" + (f" ({eager.path})" if eager.path else "")
    return AudioRef(fetch=functools.partial(_fetch_cell, rows.audio_at, index, origin), origin=origin,
                    seconds=clip_seconds(eager))


def _fetch_cell(audio_at: Callable[[int], Any], index: int, origin: str) -> AudioRef:
    return dataclasses.replace(_audio_ref(audio_at(index)), origin=origin)


def _dataset_rows(dataset: Any, origin: str, layout: str) -> SplitRows:
    """Rows of a ``datasets.Dataset`` with its audio kept encoded (decoding needs torchcodec; a bad clip must not
    stop iteration)."""
    import datasets

    if "audio" in dataset.column_names:
        try:
            dataset = dataset.cast_column("audio", datasets.Audio(decode=False))
        except Exception as err:
            raise DataError(f"{origin}: the `audio` column is not an audio column ({err})") from err

    def read(limit: int | None) -> Iterator[dict[str, Any]]:
        rows = dataset if limit is None else dataset.select(range(min(limit, len(dataset))))
        return iter(rows)

    def audio_at(index: int) -> Any:  # arrow memory-mapped from the datasets cache: a random read is cheap
        return dataset[index]["audio"]

    audio = audio_at if "audio" in dataset.column_names else None
    return SplitRows(tuple(dataset.column_names), read, origin, layout, audio)


def _parquet_rows(files: list[Path], layout: str) -> SplitRows:
    """Rows of parquet files read with pyarrow (no copy into the datasets cache); audio cells stay ``{bytes, path}``."""
    import pyarrow.parquet as pq

    columns = tuple(pq.read_schema(files[0]).names)

    def rows() -> Iterator[dict[str, Any]]:
        for file in files:
            for batch in pq.ParquetFile(file).iter_batches(batch_size=64):
                yield from batch.to_pylist()

    def read(limit: int | None) -> Iterator[dict[str, Any]]:
        return itertools.islice(rows(), limit)

    # Row index -> (file, row group, offset): a deferred clip reads its row group's audio column, and the last few
    # groups read are kept (batches sorted by duration visit groups out of order, so a clip may cost a group read).
    groups = [(file, g, pq.ParquetFile(file).metadata.row_group(g).num_rows)
              for file in files for g in range(pq.ParquetFile(file).metadata.num_row_groups)]
    starts = list(itertools.accumulate((n for _, _, n in groups), initial=0))

    @functools.lru_cache(maxsize=4)
    def group_audio(k: int) -> Any:
        file, g, _ = groups[k]
        return pq.ParquetFile(file).read_row_group(g, columns=["audio"]).column("audio")

    def audio_at(index: int) -> Any:
        k = bisect.bisect_right(starts, index) - 1
        return group_audio(k)[index - starts[k]].as_py()

    origin = str(files[0]) if len(files) == 1 else f"{files[0].parent}/ ({len(files)} parquet files)"
    return SplitRows(columns, read, origin, layout, audio_at if "audio" in columns else None)


def _open_hub(subset: str, split: str, revision: str | None) -> SplitRows:
    import datasets

    origin = f"hf://{REPO_ID} {subset}/{split}@{revision or 'main'}"
    try:
        dataset = datasets.load_dataset(REPO_ID, subset, split=split, revision=revision)
    except Exception as err:
        raise DataError(f"cannot load {origin}: {err}; pass --data-dir to use a local copy") from err
    return _dataset_rows(dataset, origin, "hub")


def _save_to_disk_split(base: Path, subset: str, split: str) -> SplitRows | None:
    """A ``save_to_disk`` copy at ``base`` (DatasetDict, single Dataset, or ``base/<split>`` Dataset), if any."""
    import datasets

    if (base / "dataset_dict.json").is_file():
        dataset_dict = datasets.load_from_disk(str(base))
        if split not in dataset_dict:
            raise DataError(f"no VoiceBench {subset}/{split} in the save_to_disk copy {base} (its splits: "
                            f"{', '.join(sorted(dataset_dict))})")
        return _dataset_rows(dataset_dict[split], f"{base} [{split}]", "save_to_disk")
    if (base / split / "state.json").is_file():
        return _dataset_rows(datasets.load_from_disk(str(base / split)), str(base / split), "save_to_disk")
    if (base / "state.json").is_file():
        dataset = datasets.load_from_disk(str(base))
        # A bare Dataset carries no split name unless it was loaded with one; accept it only when unambiguous.
        stored = str(dataset.split) if dataset.split is not None else None
        if stored != split and not (stored is None and len(SUBSETS[subset].splits) == 1):
            raise DataError(f"no VoiceBench {subset}/{split} in {base}: a single-split save_to_disk copy (split "
                            f"{stored!r})")
        return _dataset_rows(dataset, str(base), "save_to_disk")
    return None


def _open_local(data_dir: str, subset: str, split: str) -> SplitRows:
    base = Path(data_dir) / subset
    found = _save_to_disk_split(base, subset, split)
    if found is not None:
        return found
    # Hub snapshot (`huggingface-cli download --repo-type dataset hlt-lab/voicebench --local-dir DIR`):
    # DIR/<subset>/<split>-00000-of-0000N.parquet; the parquet-converter branch uses DIR/<subset>/<split>/*.parquet.
    patterns = [base / f"{glob.escape(split)}-*.parquet", base / glob.escape(split) / "*.parquet"]
    for pattern in patterns:
        files = sorted(Path(p) for p in glob.glob(str(pattern)))
        if files:
            return _parquet_rows(files, "parquet")
    looked = [
        str(base / "dataset_dict.json"), str(base / split / "state.json"), str(base / "state.json"),
        *(str(p) for p in patterns),
    ]  # fmt: skip
    raise DataError(f"no VoiceBench {subset}/{split} under --data-dir {data_dir}; looked for: {'; '.join(looked)}")


def open_split(subset: str, split: str, options: LoadOptions) -> SplitRows:
    """The rows of one split, from ``options.data_dir`` when given, else from the hub."""
    if options.data_dir:
        return _open_local(options.data_dir, subset, split)
    return _open_hub(subset, split, options.revision or VOICEBENCH_REVISION)


# ------------------------------------------------------------------------------------------------- benchmark


def load_voicebench(request: SubsetRequest, options: LoadOptions) -> list[Item]:
    """Items of one subset: its resolved splits in order, at most ``options.limit`` in total."""
    items: list[Item] = []
    for split in resolve_splits(request.subset, request.split):
        remaining = None if options.limit is None else options.limit - len(items)
        if remaining is not None and remaining <= 0:
            break
        rows = open_split(request.subset, split, options)
        check_columns(rows.columns, subset=request.subset, split=split, origin=rows.origin)
        before = len(items)
        for index, row in enumerate(rows.read(remaining)):
            item = row_to_item(row, subset=request.subset, split=split, index=index, origin=rows.origin)
            if item.audio is not None:
                item = dataclasses.replace(item, audio=deferred_audio(rows, index, row["audio"]))
            items.append(item)
        expected = SUBSETS[request.subset].splits[split]
        if remaining is None and len(items) - before != expected:
            log.warning("VoiceBench %s/%s has %d rows, expected %d (%s)", request.subset, split,
                        len(items) - before, expected, rows.origin)  # fmt: skip
    return items


def describe_voicebench(request: SubsetRequest, options: LoadOptions) -> dict[str, Any]:
    """Provenance for the manifest: repo, revision (or why there is none), source, resolved splits."""
    revision = options.revision or (None if options.data_dir else VOICEBENCH_REVISION)
    description: dict[str, Any] = {
        "repo": REPO_ID,
        "splits": list(resolve_splits(request.subset, request.split)),
        "source": f"local:{options.data_dir}" if options.data_dir else "hub",
        "revision": revision,
        "scorer": SUBSETS[request.subset].scorer,
    }
    if revision is None:
        description["revision_note"] = (
            "local copy: its hub revision is unknown (pass --revision to record it)" if options.data_dir
            else REVISION_NOTE
        )  # fmt: skip
    return description


BENCHMARK = Benchmark(
    name="voicebench",
    load=load_voicebench,
    scorer={name: info.scorer for name, info in SUBSETS.items()},
    default_subsets=LEADERBOARD_SUBSETS,
    splits={name: (*info.splits, ALL_SPLITS) for name, info in SUBSETS.items()},
    unsupported=UNSUPPORTED,
    describe=describe_voicebench,
)
