"""Phi-4-multimodal (``microsoft/Phi-4-multimodal-instruct``, transformers' native format: ``model_type``
``phi4_multimodal``): a Phi-4-mini decoder whose embedding layer holds the audio encoder (``embed_tokens_extend.
audio_embed``: a conformer behind NeMo conv subsampling, then the speech up/down projections) and the image
encoder, with a LoRA adapter per modality in ``speech-lora/`` and ``vision-lora/``.

Prompt layout (transformers' own integration test of the checkpoint; the model card's ``<|audio_1|>`` is the remote
code's spelling of the same placeholder): Phi-4-mini's chat template over string contents, no system turn (the
template has no default one), the placeholder straight before the instruction::

    <|user|><|audio|>What is happening in this audio?<|end|><|assistant|>

The placeholder is expanded to one ``<|audio|>`` per audio embedding (``Phi4MultimodalFeatureExtractor``'s
``audio_embed_sizes``: 80-bin log-mel frames of 25 ms every 10 ms, compressed 8x: ~12.5 per second). There is no
fixed window (the encoder runs clips longer than 500 embeddings in chunks), so long clips are not refused.

The speech adapter is loaded from ``speech-lora/`` (with peft, as ``model.load_adapter(..., adapter_kwargs=
{"subfolder": "speech-lora"})`` would, which in transformers 5 needs peft >= 0.22) and is on for audio prompts only,
as the reference code switches it; without it the model does not use the audio (transformers' own integration test,
run without it, gets "I'm sorry, but I can't listen to audio"). The vision adapter is not loaded.

Backbone: ``microsoft/Phi-4-mini-instruct``. The Phi-4-Mini technical report (arXiv 2503.01743) keeps the language
model frozen and adds the modalities through the encoders and LoRA adapters, so with the adapter off (text prompts)
the speech LLM is its backbone; ``gap``'s backbone check compares the weights on the run's pair.

``Phi4MultimodalProcessor`` cannot be built without torchvision (its image processor), so inputs are built as it
builds them for text and audio, from the tokenizer and the feature extractor (:class:`Phi4InputFiles`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.audio_text import (AudioTextModel, AudioTextSpec, LengthGroupedAudio, audio_text_family,
                                             load_audio_text)
from speechlm_eval.models.base import LoadOptions, Prompt
from speechlm_eval.models.speech_adapter import load_speech_adapter, set_speech_adapter, speech_adapter_loaded

AUDIO_TOKEN = "<|audio|>"
SPEECH_LORA = "speech-lora"  # the subfolder of the checkpoint that holds the speech adapter


@dataclass
class Phi4InputFiles:
    """What the adapter reads besides the weights (it stands where other families keep their processor):
    ``save_pretrained`` writes the tokenizer, the processor config with the feature extractor's, the chat template."""

    tokenizer: Any
    feature_extractor: Any
    chat_template: str
    processor_config: dict[str, Any] = field(default_factory=dict)  # the rest of processor_config.json, kept

    @property
    def audio_token(self) -> str:
        return getattr(self.tokenizer, "audio_token", None) or AUDIO_TOKEN

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        config = {**self.processor_config, "audio_processor": self.feature_extractor.to_dict(),
                  "processor_class": "Phi4MultimodalProcessor"}
        (directory / "processor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")


def encode_audio(adapter: AudioTextModel, texts: list[str], audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Inputs as ``Phi4MultimodalProcessor`` builds them for text and audio: ``audio_input_features`` ``(batch,
    frames, 80)``, ``audio_embed_sizes`` ``(batch,)``, ``audio_attention_mask`` (batches of two or more), and one
    ``<|audio|>`` per audio embedding in ``input_ids``."""
    features = adapter.processor.feature_extractor(audios, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    token = adapter.processor.audio_token
    sizes = features["audio_embed_sizes"].tolist()
    texts = [t.replace(token, token * int(n), 1) for t, n in zip(texts, sizes)]
    encoded = dict(adapter.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    encoded.update({k: v for k, v in features.items() if isinstance(v, torch.Tensor)})
    return encoded


def audio_token_count(n_samples: int, extractor: Any) -> int:
    """Audio embeddings for a clip: full 25 ms frames every 10 ms, then ``audio_compression_rate`` (8) and
    ``audio_downsample_rate`` (1), each rounding up (``Phi4MultimodalFeatureExtractor._compute_audio_embed_size``)."""
    frames = (n_samples - extractor.win_length) // extractor.hop_length + 1
    if frames <= 0:
        return 0
    size = extractor._compute_audio_embed_size(torch.tensor([frames * extractor.audio_feat_stride]))
    return int(size[0])


SPEC = AudioTextSpec(
    family="phi4-multimodal",
    model_types=("phi4_multimodal",),
    model_class="Phi4MultimodalForCausalLM",
    system_prompt=None,
    audio_tokens=lambda n, processor: audio_token_count(n, processor.feature_extractor),
    min_audio_tokens=1,
    encode=encode_audio,
    language_model=lambda model: model.model,
    audio_encoder=lambda model: model.model.embed_tokens_extend.audio_embed.encoder,
    # The decoder's fused attention projections; the audio encoder (q/k/v/o_proj under embed_tokens_extend) and the
    # vision encoder (q/k/v/out_proj) are not matched.
    lora_targets=r"(.*\.)?model\.layers\.\d+\.self_attn\.(qkv_proj|o_proj)",
    extras={"backbone": "microsoft/Phi-4-mini-instruct",
            "notes": "LM frozen in multimodal training, speech-lora adapter on for audio prompts only: on text the "
                     "speech LLM is its backbone; no fixed audio window; no system turn; native format only "
                     "(model_type phi4_multimodal, not the remote-code phi4mm)"},
)


class Phi4MultimodalModel(LengthGroupedAudio, AudioTextModel):
    """A Phi-4-multimodal checkpoint: string-content conversations, the speech adapter switched per batch, and
    the speech projector exposed as one module (its two linear layers)."""

    speech_adapter_folder = SPEECH_LORA  # the checkpoint's subfolder for the audio-only adapter

    def __init__(self, name: str, model: torch.nn.Module, processor: Phi4InputFiles, revision: str | None = None):
        super().__init__(name, model, processor, SPEC, revision=revision, tokenizer=processor.tokenizer)
        embed = model.model.embed_tokens_extend.audio_embed
        self._projector = torch.nn.ModuleList([embed.up_proj_for_speech, embed.down_proj_for_speech])

    def conversation(self, prompt: Prompt) -> list[dict[str, Any]]:
        messages = [] if prompt.system is None else [{"role": "system", "content": prompt.system}]
        user = (self.processor.audio_token if prompt.audio is not None else "") + (prompt.text or "")
        return [*messages, {"role": "user", "content": user}]

    def encode(self, prompts: Sequence[Prompt]):
        set_speech_adapter(self.model, active=any(p.audio is not None for p in prompts))
        return super().encode(prompts)

    def projector(self) -> torch.nn.Module:
        """``up_proj_for_speech`` and ``down_proj_for_speech`` (the GELU between them has no weights); the vision
        path's projections (``*_for_vision_speech``, used when an image is present too) are not part of it."""
        return self._projector

    def kept_frozen(self) -> list[torch.nn.Module]:
        """What a full fine-tune of :meth:`language_model` leaves frozen: the whole modality embedding inside it (audio
        encoder and projector, the vision path, the projections used when an image comes with the audio)."""
        return [self.model.model.embed_tokens_extend]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "speech_adapter": speech_adapter_loaded(self.model)}


def load_input_files(name_or_path: str, options: LoadOptions) -> Phi4InputFiles:
    from transformers import AutoTokenizer, Phi4MultimodalFeatureExtractor, Phi4MultimodalProcessor

    from speechlm_eval.models.base import ModelLoadError

    common = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    extractor = Phi4MultimodalFeatureExtractor.from_pretrained(name_or_path, **common)
    processor_dict, _ = Phi4MultimodalProcessor.get_processor_dict(name_or_path, revision=options.revision)
    template = processor_dict.pop("chat_template", None) or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ModelLoadError(f"{name_or_path!r} has no chat template (neither the processor's nor the tokenizer's)")
    rest = {k: v for k, v in processor_dict.items() if k not in ("audio_processor", "feature_extractor")}
    return Phi4InputFiles(tokenizer, extractor, template, rest)


def load(name_or_path: str, options: LoadOptions) -> Phi4MultimodalModel:
    processor = load_input_files(name_or_path, options)
    model = load_audio_text(name_or_path, options, SPEC, processor=processor, tokenizer=processor.tokenizer).model
    if load_speech_adapter(model, name_or_path, options, subfolder=SPEECH_LORA):
        model.to(next(model.parameters()).device)
    return Phi4MultimodalModel(name_or_path, model, processor, revision=options.revision)


FAMILY = audio_text_family(SPEC, load)
