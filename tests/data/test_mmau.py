"""MMAU test-mini loading on the real HEAD JSON: counts, quirks kept, version, audio paths, validation errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from speechlm_eval.data import mmau
from speechlm_eval.data.audio import AudioError, decode_audio
from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import DataError, LoadOptions, SubsetRequest

from .fakes import tone, wav_bytes

MMAU_JSON = Path(__file__).resolve().parents[3] / "shared" / "data" / "mmau-test-mini.json"
if not MMAU_JSON.is_file():  # the repo may be checked out elsewhere than /work/main
    MMAU_JSON = Path("/work/shared/data/mmau-test-mini.json")
pytestmark = pytest.mark.skipif(not MMAU_JSON.is_file(), reason="shared MMAU JSON not available")
REQUEST = SubsetRequest("mmau", "mmau")


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mmau-audio")


@pytest.fixture(scope="module")
def items(audio_dir: Path) -> list[Item]:
    return mmau.load_mmau(REQUEST, LoadOptions(mmau_json=str(MMAU_JSON), mmau_audio_dir=str(audio_dir)))


def test_counts(items: list[Item]) -> None:
    assert len(items) == 1000 and len({item.id for item in items}) == 1000
    assert all(item.subset == "mmau" and item.text is None and not item.has_text_equivalent for item in items)
    assert Counter(item.meta["task"] for item in items) == {"sound": 333, "music": 334, "speech": 333}
    assert Counter(item.meta["difficulty"] for item in items) == {"easy": 224, "medium": 540, "hard": 236}
    by_cell = Counter((item.meta["task"], item.meta["difficulty"]) for item in items)
    assert by_cell[("sound", "easy")] == 21 and by_cell[("speech", "hard")] == 117
    assert len({item.meta["sub-category"] for item in items}) == 27


def test_list_categories_are_normalised(items: list[Item]) -> None:
    listed = [item for item in items if isinstance(item.meta["category_raw"], list)]
    assert len(listed) == 13
    assert all(item.meta["category"] == "Reasoning" and item.meta["category_raw"] == ["Reasoning"] for item in listed)
    assert all(item.meta["task"] == "sound" for item in listed)
    assert Counter(item.meta["category"] for item in items) == {"Reasoning": 677, "Information Extraction": 323}


def test_duplicates_and_stray_spaces_are_kept(items: list[Item]) -> None:
    raw = {row["id"]: row for row in json.loads(MMAU_JSON.read_text())}
    assert all(item.choices == tuple(raw[item.id]["choices"]) and item.reference == raw[item.id]["answer"]
               for item in items)  # fmt: skip
    assert sum(len(set(item.choices)) < len(item.choices) for item in items) == 27
    assert sum(item.reference != item.reference.strip() for item in items) == 4
    assert all(item.reference in item.choices for item in items)


def test_version_is_recognised() -> None:
    version = mmau.mmau_version(MMAU_JSON)
    assert version["sha256"] == "9f18fda99f8dbc2bc5ecd6323fb5063309f54969810b5c6f1caeb3b8d904cf1c"
    assert version["version"] == "HEAD f0a4a97d (2025-08-09)" and version["known"]


def test_unknown_file_has_no_version(tmp_path: Path) -> None:
    other = tmp_path / "m.json"
    other.write_text("[]")
    assert mmau.mmau_version(other)["version"] is None and not mmau.mmau_version(other)["known"]


def test_prompt_lists_choices_and_asks_for_text(items: list[Item]) -> None:
    item = items[0]
    lines = item.audio_instruction.split("\n")
    assert lines[0] == item.meta["question"]
    assert lines[1 : 1 + len(item.choices)] == [choice.strip() for choice in item.choices]
    assert "text" in lines[-1] and "letter" not in item.audio_instruction.lower()


def test_audio_resolved_by_basename_and_missing_clip_is_per_item(items: list[Item], audio_dir: Path) -> None:
    item = items[0]
    assert item.audio.path == str(audio_dir / f"{item.id}.wav")
    assert item.meta["audio_id"] == f"./test-mini-audios/{item.id}.wav"
    with pytest.raises(AudioError, match=item.id):
        decode_audio(item.audio, item_id=item.id)
    Path(item.audio.path).write_bytes(wav_bytes(tone(16_000, 400), 16_000))
    assert decode_audio(item.audio, item_id=item.id).shape == (400,)


def test_nested_test_mini_audios_folder(tmp_path: Path) -> None:
    rows = json.loads(MMAU_JSON.read_text())[:1]
    (tmp_path / "test-mini-audios").mkdir()
    clip = tmp_path / "test-mini-audios" / f"{rows[0]['id']}.wav"
    clip.write_bytes(b"x")
    options = LoadOptions(mmau_json=str(MMAU_JSON), mmau_audio_dir=str(tmp_path), limit=1)
    assert mmau.load_mmau(REQUEST, options)[0].audio.path == str(clip)


def test_no_audio_dir_explains_download() -> None:
    with pytest.raises(DataError, match="gamma-lab-umd/MMAU-test-mini.*--mmau-audio-dir"):
        mmau.load_mmau(REQUEST, LoadOptions(mmau_json=str(MMAU_JSON)))
    with pytest.raises(DataError, match="--mmau-json"):
        mmau.load_mmau(REQUEST, LoadOptions(mmau_audio_dir="/tmp"))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda row: row.update(answer="Nobody"), "not one of the choices"),
        (lambda row: row.update(task="vision"), "unknown task"),
        (lambda row: row.update(difficulty="extreme"), "unknown difficulty"),
        (lambda row: row.pop("sub-category"), "missing keys"),
        (lambda row: row.update(extra=1), "unexpected keys"),
    ],
)
def test_bad_rows_name_the_item(tmp_path: Path, change, expected: str) -> None:
    rows = json.loads(MMAU_JSON.read_text())[:3]
    change(rows[1])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(DataError, match=expected) as info:
        mmau.read_rows(bad)
    assert rows[1]["id"] in str(info.value) and str(bad) in str(info.value)


def test_duplicate_ids_rejected(tmp_path: Path) -> None:
    rows = json.loads(MMAU_JSON.read_text())[:2]
    rows[1]["id"] = rows[0]["id"]
    bad = tmp_path / "dup.json"
    bad.write_text(json.dumps(rows))
    with pytest.raises(DataError, match="duplicate id"):
        mmau.read_rows(bad)
