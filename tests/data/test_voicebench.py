"""VoiceBench loading from local copies (save_to_disk and hub-style parquet): ids, text, meta, audio, errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from speechlm_eval.data import voicebench
from speechlm_eval.data.audio import AudioError, decode_audio
from speechlm_eval.data.registry import DataError, LoadOptions, SubsetRequest

from . import fakes


@pytest.fixture(scope="module", params=["save_to_disk", "parquet"])
def data_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(fakes.build(tmp_path_factory.mktemp(request.param), request.param))


def _load(data_dir: str, subset: str, split: str | None = None, limit: int | None = None):
    return voicebench.load_voicebench(SubsetRequest("voicebench", subset, split), LoadOptions(data_dir, limit=limit))


def test_openbookqa_items(data_dir: str) -> None:
    items = _load(data_dir, "openbookqa")
    assert [item.id for item in items] == ["openbookqa/test/0", "openbookqa/test/1", "openbookqa/test/2"]
    assert [item.text for item in items] == [row["prompt"] for row in fakes.ROWS["openbookqa"]["test"]]
    assert [item.reference for item in items] == ["B", "A", "C"]
    assert all(item.subset == "openbookqa" and item.meta == {"split": "test"} for item in items)
    assert all(item.audio_instruction is None and item.has_text_equivalent for item in items)


def test_audio_decodes_and_resamples(data_dir: str) -> None:
    first, second, _ = _load(data_dir, "openbookqa")
    slow = decode_audio(first.audio, item_id=first.id)
    assert slow.shape == (round(fakes.SLOW_SAMPLES * 16_000 / fakes.SLOW_RATE),)
    assert decode_audio(second.audio, item_id=second.id).shape == (800,)


def test_items_hold_no_audio_only_its_duration_and_a_deferred_read(data_dir: str) -> None:
    """Audio is read from the source when its batch runs: an item keeps no bytes, only the clip's duration (from its
    header, to sort batches) and where the row is; the deferred read gives the samples an eager cell gives."""
    first, second, broken = _load(data_dir, "openbookqa")
    for item in (first, second, broken):
        assert item.audio.data is None and item.audio.array is None and item.audio.fetch is not None
        assert "row" in item.audio.describe()
    assert first.audio.seconds == pytest.approx(fakes.SLOW_SAMPLES / fakes.SLOW_RATE)
    assert second.audio.seconds == pytest.approx(800 / 16_000)
    assert broken.audio.seconds is None  # no readable header: sorted last, reported when decoded
    eager = voicebench._audio_ref(fakes.audio_cell(fakes.SLOW_RATE, fakes.SLOW_SAMPLES, "q0.wav"))
    assert (decode_audio(first.audio, item_id=first.id) == decode_audio(eager, item_id=first.id)).all()


def test_corrupt_clip_is_a_per_item_error(data_dir: str) -> None:
    broken = _load(data_dir, "openbookqa")[2]  # loading itself succeeded
    with pytest.raises(AudioError, match="openbookqa/test/2"):
        decode_audio(broken.audio, item_id=broken.id)


def test_meta_keeps_other_columns(data_dir: str) -> None:
    (bbh,) = _load(data_dir, "bbh")
    assert bbh.meta["id"] == "bbh_navigate_1" and bbh.reference == "yes"
    (ifeval,) = _load(data_dir, "ifeval")
    assert ifeval.meta["key"] == 7
    assert ifeval.meta["instruction_id_list"] == ["punctuation:no_comma"]
    assert ifeval.meta["kwargs"] == [{"num_words": None, "relation": None}]
    assert ifeval.reference is None


def test_sd_qa_defaults_to_usa_and_takes_explicit_split(data_dir: str) -> None:
    (usa,) = _load(data_dir, "sd-qa")
    assert usa.id == "sd-qa/usa/0" and usa.reference == "Paris" and usa.meta["split"] == "usa"
    (aus,) = _load(data_dir, "sd-qa", "aus")
    assert aus.id == "sd-qa/aus/0" and aus.reference == "Rome"


def test_pooled_split_limit_stops_early(data_dir: str) -> None:
    # The fake mmsu has only 2 of 12 domains: a limit inside `law` must not touch the missing ones.
    assert [item.id for item in _load(data_dir, "mmsu", limit=2)] == ["mmsu/law/0", "mmsu/law/1"]
    with pytest.raises(DataError, match="mmsu/other"):
        _load(data_dir, "mmsu")
    assert [item.id for item in _load(data_dir, "openbookqa", limit=1)] == ["openbookqa/test/0"]


def test_nothing_found_lists_what_was_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        _load(str(tmp_path), "advbench")
    message = str(info.value)
    assert "advbench/test" in message and "dataset_dict.json" in message and "test-*.parquet" in message


def test_unknown_subset_split_and_mtbench(data_dir: str) -> None:
    with pytest.raises(DataError, match="valid: .*openbookqa"):
        _load(data_dir, "nope")
    with pytest.raises(DataError, match="no split 'xyz'.*usa"):
        _load(data_dir, "sd-qa", "xyz")
    with pytest.raises(DataError, match="not supported"):
        _load(data_dir, "mtbench")


def _write_single(root: Path, layout: str, subset: str, rows: list[dict]) -> Path:
    dataset = fakes.split_dataset("openbookqa", "test", rows)
    if layout == "save_to_disk":
        dataset.save_to_disk(str(root / subset))
        return root / subset
    (root / subset).mkdir(parents=True)
    target = root / subset / "test-00000-of-00001.parquet"
    dataset.to_parquet(str(target))
    return target


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet"])
def test_missing_columns_name_file_and_column(tmp_path: Path, layout: str) -> None:
    origin = _write_single(tmp_path, layout, "openbookqa", [{"question": "q?", "reference": "A"}])
    with pytest.raises(DataError) as info:
        _load(str(tmp_path), "openbookqa")
    assert "prompt" in str(info.value) and str(origin) in str(info.value) and "openbookqa/test" in str(info.value)
    origin = _write_single(tmp_path / "b", layout, "openbookqa", [{"prompt": "q?"}])
    with pytest.raises(DataError, match="missing column.*reference") as info:
        _load(str(tmp_path / "b"), "openbookqa")
    assert str(origin) in str(info.value)


def test_null_reference_names_the_item(tmp_path: Path) -> None:
    _write_single(tmp_path, "parquet", "sd-qa", [{"prompt": "q?", "reference": None}])
    (tmp_path / "sd-qa" / "test-00000-of-00001.parquet").rename(tmp_path / "sd-qa" / "usa-00000-of-00001.parquet")
    with pytest.raises(DataError, match=r"sd-qa/usa/0 .*reference"):
        _load(str(tmp_path), "sd-qa")


def test_single_dataset_save_to_disk_is_accepted(tmp_path: Path) -> None:
    fakes.split_dataset("bbh", "test").save_to_disk(str(tmp_path / "bbh"))
    assert [item.id for item in _load(str(tmp_path), "bbh")] == ["bbh/test/0"]


def test_size_mismatch_is_logged(data_dir: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        _load(data_dir, "bbh")
    assert "expected 1000" in caplog.text


def test_describe_flags_unpinned_revision(data_dir: str) -> None:
    request = SubsetRequest("voicebench", "sd-qa")
    local = voicebench.describe_voicebench(request, LoadOptions(data_dir))
    assert local["splits"] == ["usa"] and local["revision"] is None and "revision" in local["revision_note"]
    hub = voicebench.describe_voicebench(request, LoadOptions())
    assert hub["revision"] == voicebench.VOICEBENCH_REVISION
    if voicebench.VOICEBENCH_REVISION is None:
        assert hub["revision_note"] == voicebench.REVISION_NOTE
    pinned = voicebench.describe_voicebench(request, LoadOptions(revision="abc123"))
    assert pinned["revision"] == "abc123" and "revision_note" not in pinned


def test_constants_match_benchmarks_table() -> None:
    sizes = {name: sum(info.splits.values()) for name, info in voicebench.SUBSETS.items()}
    assert sizes["mmsu"] == 3074 and sizes["sd-qa"] == 6083 and sizes["alpacaeval_speaker"] == 6996
    assert voicebench.SUBSETS["sd-qa"].default_splits == ("usa",)
    assert len(voicebench.SUBSETS["mmsu"].default_splits) == 12
    assert len(voicebench.LEADERBOARD_SUBSETS) == 9 and "alpacaeval" not in voicebench.LEADERBOARD_SUBSETS
    assert {info.scorer for info in voicebench.SUBSETS.values()} == {"open", "qa", "mcq", "bbh", "ifeval", "harm"}
