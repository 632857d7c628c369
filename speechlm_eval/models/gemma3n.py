"""Gemma 3n (``google/gemma-3n-E2B-it``, ``google/gemma-3n-E4B-it``): a USM conformer audio tower, ``embed_audio``
(the multimodal embedder that projects it into the LM), a MobileNetV5 vision tower, and the Gemma 3n language model
(MatFormer, per-layer embeddings, AltUp, KV sharing), text output only.

Prompt layout (the checkpoint's chat template; the model card puts the audio before the instruction)::

    <bos><start_of_turn>user
    {system}\\n\\n<audio_soft_token>{text}<end_of_turn>
    <start_of_turn>model

The template has no system role: a system message is folded into the first user turn ("{system}" plus a blank
line), and without one there is none (``default_system_prompt()`` is ``None``, so ``gap`` sends no system turn to
either model unless ``--system-prompt`` asks for one). ``Gemma3nProcessor`` expands ``<audio_soft_token>`` to
``\\n\\n<start_of_audio>`` + 188 soft tokens + ``<end_of_audio>\\n\\n`` for every clip, whatever its length (the
feature extractor pads to the batch's longest clip and truncates at 30 s; the model pads the encoder's output to 188
with the embedding of the last audio-vocabulary token). Clips over 30 s are refused (the extractor would cut them
silently). The template starts with ``<bos>`` and the tokenizer adds one by default: text is tokenized without
special tokens (the generic path), and so is the processor call here, as ``apply_chat_template(tokenize=True)`` does.

Backbone: none public. Gemma 3n's language model was trained with its encoders and has no text-only release;
Gemma 3 (``google/gemma-3-4b-it``) is another architecture (no per-layer embeddings/AltUp), so any text LLM is a
proxy.

The vision tower is a timm model (which needs torchvision): :class:`Gemma3nWithoutVisionTower` builds
``Gemma3nForConditionalGeneration`` with a stub in its place and ignores a checkpoint's ``vision_tower.*`` weights.
Audio and text inputs never reach the vision tower (its ``embed_vision`` token embedder is kept, the forward pass
needs it). The audio front end's reverse-causal convolutions look past a clip's end into the batch's padding, so audio
prompts run in sub-batches of equal clip length (:class:`~.audio_text.LengthGroupedAudio`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.audio_text import (AudioTextModel, AudioTextSpec, LengthGroupedAudio, audio_text_family,
                                             load_audio_text)
from speechlm_eval.models.base import LoadOptions, ModelInputError, Prompt


class VisionTowerOmitted(torch.nn.Module):
    """Stands where Gemma 3n's timm MobileNetV5 vision tower sits: no weights, and no image input."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise ModelInputError("this Gemma 3n was loaded without its vision tower (timm needs torchvision): "
                              "image inputs are not supported")


@contextlib.contextmanager
def vision_tower_omitted() -> Iterator[None]:
    """While a Gemma 3n model is constructed, ``AutoModel.from_config`` of its vision config gives the stub."""
    from transformers.models.gemma3n import modeling_gemma3n

    real = modeling_gemma3n.AutoModel

    class AutoModelWithoutVision:
        @staticmethod
        def from_config(config: Any, *args: Any, **kwargs: Any) -> torch.nn.Module:
            if getattr(config, "model_type", None) == "gemma3n_vision":
                return VisionTowerOmitted()
            return real.from_config(config, *args, **kwargs)

    modeling_gemma3n.AutoModel = AutoModelWithoutVision
    try:
        yield
    finally:
        modeling_gemma3n.AutoModel = real


def without_vision_tower_class():
    """``Gemma3nForConditionalGeneration`` built with :class:`VisionTowerOmitted` (a class, made on first use)."""
    from transformers import Gemma3nForConditionalGeneration

    class Gemma3nWithoutVisionTower(Gemma3nForConditionalGeneration):
        _keys_to_ignore_on_load_unexpected = [r"^model\.vision_tower\."]

        def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
            with vision_tower_omitted():
                super().__init__(config, *args, **kwargs)

        def save_pretrained(self, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
            """Saved under the real class name, so the checkpoint is a Gemma 3n one (minus vision weights)."""
            out = super().save_pretrained(save_directory, *args, **kwargs)
            path = Path(save_directory) / "config.json"
            if path.exists():
                config = json.loads(path.read_text())
                config["architectures"] = ["Gemma3nForConditionalGeneration"]
                path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            return out

    return Gemma3nWithoutVisionTower


_CLASS: Any = None


def model_class() -> Any:
    global _CLASS
    if _CLASS is None:
        _CLASS = without_vision_tower_class()
    return _CLASS


def window_seconds(processor: Any) -> float | None:
    """The longest clip ``Gemma3nAudioFeatureExtractor`` keeps: its call's ``max_length`` (480 000 samples, 30 s),
    past which it truncates silently (``Gemma3nProcessor`` passes no ``max_length`` of its own)."""
    extractor = processor.feature_extractor
    parameters = inspect.signature(extractor).parameters  # its ``__call__``'s, through a proxy's ``__wrapped__``
    default = parameters["max_length"].default if "max_length" in parameters else None
    return int(default) / extractor.sampling_rate if isinstance(default, int) else None


def encoder_tokens(n_samples: int, extractor: Any, audio_config: Any) -> int:
    """Audio-tower outputs that carry the clip (not padding) for ``n_samples`` alone: mel frames (the extractor's
    padding to a multiple of 128 samples, 32 ms frames every 10 ms, a frame counts when it starts inside the clip),
    then the two stride-2 convolutions (reverse-causal time padding of 2), then every ``conf_reduction_factor``-th."""
    padded = -(-n_samples // 128) * 128
    frames = (padded - (extractor.frame_length + 1)) // extractor.hop_length + 1 if padded > extractor.frame_length else 0
    valid = min(frames, -(-n_samples // extractor.hop_length))
    sub, stride = frames, 1
    for (kernel, _), (step, _) in zip(audio_config.sscp_conv_kernel_size, audio_config.sscp_conv_stride_size):
        sub = (sub + kernel - 1 - kernel) // step + 1 if sub > 0 else 0
        stride *= step
    valid_sub = min(sub, -(-valid // stride))
    return -(-valid_sub // audio_config.conf_reduction_factor)


EXTRACTOR_DEFAULTS = ("padding", "max_length", "truncation", "pad_to_multiple_of")


def extractor_defaults(extractor: Any) -> dict[str, Any]:
    """The feature extractor's own call defaults for padding and truncation (30 s, multiples of 128 samples).

    Passed explicitly because ``ProcessorMixin`` copies same-named keys of the tokenizer's init kwargs into every
    modality's kwargs, and a tokenizer saved after a padded call (as distillation saves a student's processor) is
    reloaded with ``max_length: None, pad_to_multiple_of: None`` from its ``tokenizer.json`` padding: the extractor
    would then pad differently and refuse to truncate ("make sure that max_length is defined"). Read through the
    feature cache's proxy too (:class:`~.encoder_cache.FeatureCache`), whose own ``__call__`` has no defaults.
    """
    parameters = inspect.signature(extractor).parameters  # its ``__call__``'s, through a proxy's ``__wrapped__``
    return {k: parameters[k].default for k in EXTRACTOR_DEFAULTS
            if k in parameters and parameters[k].default is not inspect.Parameter.empty}


def encode_audio(adapter: AudioTextModel, texts: list[str], audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """``Gemma3nProcessor`` inputs without a second ``<bos>`` (the template writes one) and without the
    ``token_type_ids`` the model does not read (prompt-length tensors that teacher forcing would not extend); the
    feature extractor runs with its own padding defaults (:func:`extractor_defaults`)."""
    encoded = adapter.processor(text=texts, audio=audios, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                                text_kwargs={"padding": True, "add_special_tokens": False},
                                audio_kwargs=extractor_defaults(adapter.processor.feature_extractor))
    return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor) and k != "token_type_ids"}


SPEC = AudioTextSpec(
    family="gemma3n",
    model_types=("gemma3n",),
    model_class="Gemma3nForConditionalGeneration",
    system_prompt=None,
    audio_tokens=lambda n, processor: int(processor.audio_seq_length),
    min_audio_tokens=1,
    max_audio_seconds=window_seconds,
    encode=encode_audio,
    extras={"backbone": None,
            "notes": "no public text-only Gemma 3n: any text LLM is a proxy; no system role (folded into the user "
                     "turn); 188 audio tokens per clip, 30 s window; loaded without its timm vision tower"},
)


class Gemma3nModel(LengthGroupedAudio, AudioTextModel):
    """A Gemma 3n checkpoint (audio and text; the vision tower left out)."""

    def __init__(self, name: str, model: torch.nn.Module, processor: Any, revision: str | None = None) -> None:
        super().__init__(name, model, processor, SPEC, revision=revision)

    def audio_token_count(self, n_samples: int) -> int:
        """Audio-tower outputs carrying the clip (the LM always gets 188 placeholders; the rest are padding)."""
        return encoder_tokens(n_samples, self.processor.feature_extractor, self.model.config.audio_config)

    def prompt_length(self, prompt: Prompt) -> int:
        n = len(self.tokenizer(self.chat_text(prompt), add_special_tokens=False)["input_ids"])
        if prompt.audio is not None:
            expanded = self.tokenizer(self.processor.full_audio_sequence, add_special_tokens=False)["input_ids"]
            n += len(expanded) - 1
        return n

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "audio_tokens_per_clip": int(self.processor.audio_seq_length),
                "vision_tower": "omitted"}


def load(name_or_path: str, options: LoadOptions) -> Gemma3nModel:
    loaded = load_audio_text(name_or_path, options, SPEC, model_class=model_class())
    return Gemma3nModel(name_or_path, loaded.model, loaded.processor, revision=options.revision)


FAMILY = audio_text_family(SPEC, load)
