"""Qwen2-Audio (and checkpoints of the same architecture): the prompt format VoiceBench uses for it.

VoiceBench (``src/models/qwen2.py``) sends a single user turn whose content is either the audio alone or the text alone,
through the processor's chat template, which adds the default system turn "You are a helpful assistant.". Items with an
instruction beside the audio (MMAU) put the audio first, then the text, in the same turn.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import Family, LoadOptions, Prompt
from speechlm_eval.models.hf_runtime import HFAdapter, check_clip, eos_token_ids, resolve_device, resolve_dtype


def conversation(prompt: Prompt) -> list[dict[str, Any]]:
    """The chat messages for one prompt, in the structure Qwen2-Audio's chat template reads."""
    content: list[dict[str, str]] = []
    if prompt.audio is not None:
        content.append({"type": "audio", "audio_url": "in-memory"})
    if prompt.text is not None:
        content.append({"type": "text", "text": prompt.text})
    messages: list[dict[str, Any]] = []
    if prompt.system is not None:
        messages.append({"role": "system", "content": prompt.system})
    messages.append({"role": "user", "content": content})
    return messages


class Qwen2AudioModel(HFAdapter):
    """A loaded Qwen2-Audio checkpoint behind the :class:`~speechlm_eval.models.base.SpeechLM` interface."""

    family = "qwen2-audio"
    accepts_audio = True

    def __init__(self, name: str, model: torch.nn.Module, processor: Any, revision: str | None = None) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.revision = revision
        extractor = processor.feature_extractor
        self.max_audio_seconds: float | None = extractor.n_samples / extractor.sampling_rate
        self._eos_ids = eos_token_ids(model, self.tokenizer)

    def chat_text(self, prompt: Prompt) -> str:
        return self.processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs; all prompts of a batch must agree on having audio (the runner batches per arm)."""
        texts = [self.chat_text(p) for p in prompts]
        with_audio = [p.audio is not None for p in prompts]
        if any(with_audio) and not all(with_audio):
            raise ValueError("a batch must be all-audio or all-text prompts")
        if not any(with_audio):
            return dict(self.processor(text=texts, return_tensors="pt", padding=True))
        for prompt in prompts:
            self.check_audio(prompt.audio)
        audios = [np.asarray(p.audio, dtype=np.float32) for p in prompts]
        encoded = self.processor(
            text=texts, audio=audios, sampling_rate=SAMPLING_RATE, return_tensors="pt", padding=True
        )
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}

    def check_audio(self, audio: np.ndarray | None) -> None:
        """Refuse clips the encoder would silently truncate to its window, and clips too short to encode."""
        if audio is not None:
            # One audio token looks exactly like an unexpanded prompt to the model, which then fails inside merge.
            check_clip(audio, max_seconds=self.max_audio_seconds, min_tokens=2,
                       n_audio_tokens=audio_token_count(len(audio), self.processor.feature_extractor.hop_length))

    def prompt_length(self, prompt: Prompt) -> int:
        n = len(self.tokenizer(self.chat_text(prompt))["input_ids"])
        if prompt.audio is not None:
            # ~25 audio tokens per second after the encoder's pooling, the window is always fully padded.
            n += int(25 * (self.max_audio_seconds or 0))
        return n

    def describe(self) -> dict:
        return self.describe_with(max_audio_seconds=self.max_audio_seconds)


def audio_token_count(n_samples: int, hop_length: int = 160) -> int:
    """Audio tokens Qwen2-Audio's encoder emits for a clip: mel frames, halved by the conv stride, halved by pooling."""
    frames = n_samples // hop_length
    return max(0, (((frames - 1) // 2 + 1) - 2) // 2 + 1) if frames > 0 else 0


def load(name_or_path: str, options: LoadOptions) -> Qwen2AudioModel:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    device = resolve_device(options.device)
    processor = AutoProcessor.from_pretrained(
        name_or_path, revision=options.revision, trust_remote_code=options.trust_remote_code
    )
    model = Qwen2AudioForConditionalGeneration.from_pretrained(
        name_or_path,
        revision=options.revision,
        dtype=resolve_dtype(options.dtype, device),
        trust_remote_code=options.trust_remote_code,
    )
    model.to(device).eval()
    return Qwen2AudioModel(name_or_path, model, processor, revision=options.revision)


FAMILY = Family(name="qwen2-audio", load=load, model_types=("qwen2_audio",), accepts_audio=True)
