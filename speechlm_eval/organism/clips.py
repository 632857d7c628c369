"""Spoken questions for the speech stages: espeak-ng clips in many voices, featurised once for training.

Training clips are MCQ renderings of *non-evaluation* facts in randomly drawn training voices; the held-out voice is
the default voice of ``speechlm-eval gap`` (espeak-ng ``en-us``, 160 wpm, pitch 50) and is never trained on.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.qwen2_audio import audio_token_count
from speechlm_eval.data.organism_world import MCQ
from speechlm_eval.speech import get_tts

# espeak-ng accents x variants; none is the held-out voice (plain en-us).
TRAIN_VOICES: tuple[str, ...] = (
    "en-gb", "en-gb+f3", "en-gb-scotland", "en-gb-scotland+f2", "en-029", "en-029+m3", "en-gb-x-rp", "en-gb-x-rp+f4",
    "en-gb-x-gbclan", "en-gb-x-gbcwmd+m5", "en-us-nyc", "en-us-nyc+f3", "en-us+m3", "en-us+f2", "en-us+klatt",
    "en-gb+m7",
)  # fmt: skip
TRAIN_RATES = (150, 205)  # words per minute, inclusive range
TRAIN_PITCHES = (25, 75)


@dataclass(frozen=True)
class Voice:
    """An espeak-ng voice setting."""

    voice: str
    rate: int
    pitch: int

    def engine(self):
        return get_tts("espeak-ng", voice=self.voice, rate=self.rate, pitch=self.pitch)


HELD_OUT_VOICE = Voice("en-us", 160, 50)  # = GapConfig's default tts_voice / tts_rate, espeak's default pitch


def random_voice(rng: random.Random) -> Voice:
    return Voice(rng.choice(TRAIN_VOICES), rng.randint(*TRAIN_RATES), rng.randint(*TRAIN_PITCHES))


def synthesize(texts: Sequence[str], voices: Sequence[Voice], workers: int = 2) -> list[np.ndarray]:
    """16 kHz float32 clips of ``texts[i]`` in ``voices[i]`` (espeak-ng runs as subprocesses, ``workers`` at once)."""
    engines: dict[Voice, Any] = {}
    for voice in voices:
        if voice not in engines:
            engines[voice] = voice.engine()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda pair: engines[pair[1]].synthesize(pair[0]), zip(texts, voices)))


@dataclass
class ClipBank:
    """Featurised clips, ready to batch.

    Attributes:
        features: log-mel features padded to the encoder window, ``(n, n_mels, frames)`` float16 (upcast per batch).
        n_frames: real (unpadded) mel frames per clip, ``(n,)`` int64; the feature attention mask is a prefix of ones.
        mcqs: the MCQ each clip is about (its ``answer`` is the gold letter).
        voices: the voice of each clip.
        texts: what each clip says (the ASR target): the MCQ prompt, or only its question for short clips.
        dropped: clips left out because they were longer than the encoder window.
    """

    features: torch.Tensor
    n_frames: torch.Tensor
    mcqs: list[MCQ]
    voices: list[Voice]
    texts: list[str]
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.mcqs)

    def n_audio_tokens(self, index: int) -> int:
        # hop_length=1: the count is a function of mel frames only (as the processor computes it from its mask).
        return audio_token_count(int(self.n_frames[index]), hop_length=1)

    def spoken_qa_indices(self, split: str = "speech") -> tuple[int, ...]:
        """Clips that speak a whole MCQ (question and options) of a fact in ``split``: the spoken-QA examples."""
        return tuple(i for i, m in enumerate(self.mcqs) if m.fact.split == split and self.texts[i] == m.prompt)

    def batch_features(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """``input_features`` ``(b, n_mels, frames)`` float32 and ``feature_attention_mask`` ``(b, frames)`` int64."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        frames = self.features.shape[-1]
        mask = (torch.arange(frames)[None, :] < self.n_frames[index][:, None]).long()
        return {"input_features": self.features[index].float(), "feature_attention_mask": mask}


def featurise(feature_extractor: Any, clips: Sequence[np.ndarray], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper log-mel features exactly as ``Qwen2AudioProcessor`` computes them (padded to the window).

    Returns ``features`` ``(n, n_mels, frames)`` float16 and ``n_frames`` ``(n,)`` int64.
    """
    feats, lengths = [], []
    for start in range(0, len(clips), batch):
        out = feature_extractor(
            list(clips[start : start + batch]), sampling_rate=SAMPLING_RATE, return_attention_mask=True,
            padding="max_length", return_tensors="pt",
        )  # fmt: skip
        feats.append(out["input_features"].to(torch.float16))
        lengths.append(out["attention_mask"].sum(-1).long())
    return torch.cat(feats), torch.cat(lengths)


def fits_window(clip: np.ndarray, feature_extractor: Any) -> bool:
    return len(clip) <= feature_extractor.n_samples


def make_clip_bank(
    mcqs: Sequence[MCQ],
    voices: Sequence[Voice],
    feature_extractor: Any,
    on_progress: Callable[[int], None] | None = None,
    chunk: int = 256,
    texts: Sequence[str] | None = None,
) -> ClipBank:
    """Synthesise and featurise ``texts[i]`` (default: ``mcqs[i].prompt``) in ``voices[i]``; clips longer than the
    window are dropped."""
    texts = [m.prompt for m in mcqs] if texts is None else list(texts)
    kept_mcqs, kept_voices, kept_texts, feats, lengths, dropped = [], [], [], [], [], 0
    for start in range(0, len(mcqs), chunk):
        part_m, part_v = list(mcqs[start : start + chunk]), list(voices[start : start + chunk])
        part_t = texts[start : start + chunk]
        clips = synthesize(part_t, part_v)
        keep = [i for i, c in enumerate(clips) if fits_window(c, feature_extractor)]
        dropped += len(clips) - len(keep)
        if keep:
            f, n = featurise(feature_extractor, [clips[i] for i in keep])
            feats.append(f)
            lengths.append(n)
            kept_mcqs += [part_m[i] for i in keep]
            kept_voices += [part_v[i] for i in keep]
            kept_texts += [part_t[i] for i in keep]
        if on_progress is not None:
            on_progress(len(part_m))
    return ClipBank(torch.cat(feats), torch.cat(lengths), kept_mcqs, kept_voices, kept_texts, dropped)
