"""Tiny local VoiceBench copies for tests: real WAV bytes in an HF Audio column, saved as save_to_disk or parquet."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import soundfile as sf

TONE_HZ = 440.0


def tone(sr: int, n: int, hz: float = TONE_HZ) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * hz * np.arange(n) / sr)).astype(np.float32)


def wav_bytes(samples: np.ndarray, sr: int, subtype: str = "FLOAT") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sr, format="WAV", subtype=subtype)
    return buffer.getvalue()


def audio_cell(sr: int, n: int, name: str) -> dict[str, Any]:
    return {"bytes": wav_bytes(tone(sr, n), sr), "path": name}


CORRUPT_AUDIO = {"bytes": b"RIFF\x00\x00\x00\x00this is not audio at all", "path": "broken.wav"}

# subset -> split -> rows (without audio); audio is added by `build`.
ROWS: dict[str, dict[str, list[dict[str, Any]]]] = {
    "openbookqa": {
        "test": [
            {"prompt": "Which is a metal? A. wood. B. iron. C. glass. D. paper.", "reference": "B"},
            {"prompt": "What melts ice? A. heat. B. cold. C. dark. D. wind.", "reference": "A"},
            {"prompt": "Where do fish live? A. trees. B. sand. C. water. D. clouds.", "reference": "C"},
        ]
    },
    "sd-qa": {
        "usa": [{"prompt": "capital of france", "reference": "Paris"}],
        "aus": [{"prompt": "capital of italy", "reference": "Rome"}],
    },
    "bbh": {"test": [{"prompt": "Is it plausible?", "reference": "yes", "id": "bbh_navigate_1"}]},
    "ifeval": {
        "test": [
            {
                "key": 7,
                "prompt": "No commas please.",
                "instruction_id_list": ["punctuation:no_comma"],
                "kwargs": [{"num_words": None, "relation": None}],
            }
        ]
    },
    "mmsu": {
        "law": [{"prompt": f"law q{i}", "reference": "A", "category": "law"} for i in range(2)],
        "engineering": [{"prompt": "eng q", "reference": "B", "category": "engineering"}],
    },
}
# openbookqa row 0 is at 22.05 kHz (resampling), row 2 is corrupt; everything else is 16 kHz.
SLOW_RATE, SLOW_SAMPLES = 22_050, 2_205


def _audio_for(subset: str, split: str, index: int) -> dict[str, Any]:
    if subset == "openbookqa" and index == 0:
        return audio_cell(SLOW_RATE, SLOW_SAMPLES, "q0.wav")
    if subset == "openbookqa" and index == 2:
        return CORRUPT_AUDIO
    return audio_cell(16_000, 800, f"{subset}-{split}-{index}.wav")


def split_dataset(subset: str, split: str, rows: list[dict[str, Any]] | None = None) -> datasets.Dataset:
    rows = ROWS[subset][split] if rows is None else rows
    columns: dict[str, list[Any]] = {key: [row[key] for row in rows] for key in rows[0]}
    columns["audio"] = [_audio_for(subset, split, i) for i in range(len(rows))]
    # Built as a {bytes, path} struct, then cast: encoding through datasets.Audio would need torchcodec.
    return datasets.Dataset.from_dict(columns).cast_column("audio", datasets.Audio())


def build(root: Path, layout: str) -> Path:
    """Write every subset of ROWS under ``root`` as ``save_to_disk`` DatasetDicts or hub-style parquet shards."""
    for subset, splits in ROWS.items():
        if layout == "save_to_disk":
            datasets.DatasetDict({s: split_dataset(subset, s) for s in splits}).save_to_disk(str(root / subset))
        else:
            (root / subset).mkdir(parents=True, exist_ok=True)
            for split in splits:
                split_dataset(subset, split).to_parquet(str(root / subset / f"{split}-00000-of-00001.parquet"))
    return root
