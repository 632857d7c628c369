"""Qwen2-Audio (and checkpoints of the same architecture): the prompt format VoiceBench uses for it.

VoiceBench (``src/models/qwen2.py``) sends a single user turn whose content is either the audio alone or the text alone,
through the processor's chat template, which adds the default system turn "You are a helpful assistant.". Items with an
instruction beside the audio (MMAU) put the audio first, then the text, in the same turn. Its language model is Qwen-7B
(hidden 4096, 32 layers), not Qwen2-7B: no public text checkpoint is its backbone, so a text LLM is a proxy.
"""

from __future__ import annotations

from typing import Any

import torch

from speechlm_eval.models import audio_text
from speechlm_eval.models.audio_text import AudioTextModel, AudioTextSpec, audio_text_family
from speechlm_eval.models.base import Prompt


def audio_token_count(n_samples: int, hop_length: int = 160) -> int:
    """Audio tokens Qwen2-Audio's encoder emits for a clip: mel frames, halved by the conv stride, halved by pooling."""
    frames = n_samples // hop_length
    return max(0, (((frames - 1) // 2 + 1) - 2) // 2 + 1) if frames > 0 else 0


def _audio_tokens(n_samples: int, processor: Any) -> int:
    return audio_token_count(n_samples, processor.feature_extractor.hop_length)


SPEC = AudioTextSpec(
    family="qwen2-audio",
    model_types=("qwen2_audio",),
    model_class="Qwen2AudioForConditionalGeneration",
    audio_tokens=_audio_tokens,
    # One audio token looks exactly like an unexpanded prompt to the model, which then fails inside its merge.
    min_audio_tokens=2,
    reuses_prompt_cache=True,
    extras={"backbone": None, "notes": "language model = Qwen-7B (4096 wide, 32 layers), not Qwen2-7B: no public chat "
                                       "checkpoint is its backbone, so any text LLM is a proxy"},
)
FAMILY = audio_text_family(SPEC)


def conversation(prompt: Prompt) -> list[dict[str, Any]]:
    """The chat messages of one prompt in this family's layout (no system turn unless the prompt has one)."""
    return audio_text.conversation(prompt, SPEC)


class Qwen2AudioModel(AudioTextModel):
    """A Qwen2-Audio checkpoint already in memory (the organism's builder wraps its freshly trained model so)."""

    def __init__(self, name: str, model: torch.nn.Module, processor: Any, revision: str | None = None) -> None:
        super().__init__(name, model, processor, SPEC, revision=revision)
