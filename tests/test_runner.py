"""The runner's batching order: longest prompts first, clips by their duration."""

from __future__ import annotations

import numpy as np

from speechlm_eval.data.item import AudioRef, Item
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.runner import ArmPlan, sorted_for_batching
from tests.data.fakes import tone, wav_bytes


def test_speech_batches_sort_encoded_clips_by_duration(tiny_pair, tmp_path) -> None:
    """VoiceBench rows carry encoded bytes and MMAU rows file paths: both are ordered by the duration in their
    header (longest first), so similar lengths share a batch; a clip whose header cannot be read goes last."""
    path = tmp_path / "long.wav"
    path.write_bytes(wav_bytes(tone(16000, 48000), 16000))
    items = [
        Item(id="short", subset="s", text="a", audio=AudioRef(data=wav_bytes(tone(16000, 8000), 16000))),
        Item(id="broken", subset="s", text="b", audio=AudioRef(data=b"not audio")),
        Item(id="long", subset="s", text="c", audio=AudioRef(path=str(path))),
        Item(id="middle", subset="s", text="d", audio=AudioRef(array=np.zeros(24000, np.float32), sampling_rate=16000)),
    ]
    model = load_model(str(tiny_pair[0]), LoadOptions(device="cpu"))
    order = [i.id for i in sorted_for_batching(items, ArmPlan("speech_llm_speech", model, items, with_audio=True))]
    assert order == ["long", "middle", "short", "broken"]
