"""Audio Flamingo 3 (NVIDIA; ``nvidia/audio-flamingo-3-hf``): a Whisper-style encoder, an MLP projector and a Qwen2.5
language model, through transformers' own ``AudioFlamingo3Processor`` and its chat template.

The real checkpoint's prompt (its processor chat template, from transformers' ``convert_audioflamingo3_to_hf.py``) is
ChatML with the default system turn "You are a helpful assistant." when the conversation has none, and a user turn
that holds one ``<sound>`` followed by the turn's text, wherever the audio part stands among the parts::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<sound>Which choice?<|im_end|>\\n
    <|im_start|>assistant\\n

The model card and the processor's own examples send no system turn, so none is sent here (the template's default
applies; ``gap`` reads it off the template and sends it to both models). The processor expands ``<sound>`` to one
token per audio token and cuts a clip into 30 s encoder windows (``feature_extractor.chunk_length``), up to
``max_audio_len`` (600 s: 20 windows); beyond that it truncates with a warning, so longer clips are refused here.
Audio tokens: mel frames (10 ms hop) summed over a clip's windows, halved by the stride-2 conv, halved by pooling:
12.5 per second.

Backbone: the language model is Qwen2.5-7B (the AF3 paper; the converted checkpoint's text config has Qwen2.5-7B's
dims: hidden 3584, 28 layers, 28 heads, 4 KV heads, FFN 18944, rope_theta 1e6), with the vocabulary resized to 151672
for the added audio tokens. Which Qwen2.5-7B checkpoint (base or -Instruct) it was initialised from is not recorded
in the checkpoint; compare against ``Qwen/Qwen2.5-7B-Instruct`` (chat) or ``Qwen/Qwen2.5-7B`` and let the backbone
check say how related the weights still are.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.audio_text import AudioTextModel, AudioTextSpec, audio_text_family

AUDIO_TOKEN = "<sound>"


def audio_tokens_from_frames(frames: int) -> int:
    """Audio tokens for ``frames`` mel frames of one clip (all its windows): conv stride 2, then pooling 2 — the
    processor's ``_get_audio_token_length`` and the model's ``_get_feat_extract_output_lengths``."""
    if frames <= 0:
        return 0
    return max(0, (((frames - 1) // 2 + 1) - 2) // 2 + 1)


def audio_token_count(n_samples: int, processor: Any) -> int:
    """Audio tokens the processor gives a clip of ``n_samples``: the clip is cut into ``chunk_length`` windows (at
    most ``max_audio_len`` seconds of them), each window's mel frames counted (one per started hop), summed."""
    extractor = processor.feature_extractor
    window = int(SAMPLING_RATE * extractor.chunk_length)
    max_windows = int(processor.max_audio_len // extractor.chunk_length)
    n_windows = min(max(1, -(-n_samples // window)), max_windows)
    kept = min(n_samples, n_windows * window)
    frames = sum(-(-min(window, kept - start) // extractor.hop_length) for start in range(0, kept, window))
    return audio_tokens_from_frames(frames)


def encode_audio(adapter: AudioTextModel, texts: list[str], audios: list[np.ndarray]) -> Mapping[str, torch.Tensor]:
    """The processor's own inputs, with its own padding: ``input_ids``/``attention_mask`` ``(batch, len)`` left-padded,
    ``input_features`` ``(n_windows, 128, window_frames)`` float32 and ``input_features_mask`` ``(n_windows,
    window_frames)``, every window padded to the full encoder window.

    Not the generic call: its ``padding=True`` would reach the feature extractor too and pad windows only to the
    longest in the batch, which the encoder (fixed positional table of one window) cannot take.
    """
    encoded = adapter.processor(text=texts, audio=audios, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}


def max_audio_seconds(processor: Any) -> float:
    """The longest clip the processor keeps whole: ``max_audio_len`` (it truncates longer ones)."""
    return float(processor.max_audio_len)


SPEC = AudioTextSpec(
    family="audioflamingo3",
    model_types=("audioflamingo3",),
    model_class="AudioFlamingo3ForConditionalGeneration",
    system_prompt=None,  # the model card sends none; the template's default system turn applies
    audio_tokens=audio_token_count,
    min_audio_tokens=1,
    max_audio_seconds=max_audio_seconds,
    encode=encode_audio,
    extras={"backbone": "Qwen/Qwen2.5-7B (-Instruct is the matching chat model)",
            "notes": "language model = Qwen2.5-7B (AF3 paper; same dims), vocabulary resized to 151672 for the audio "
                     "tokens; whether base or -Instruct was its starting point is not recorded"},
    reuses_prompt_cache=True,
)
FAMILY = audio_text_family(SPEC)
