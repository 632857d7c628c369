"""The generic audio-text adapter: any transformers speech LLM whose processor renders a chat with audio content
parts (``AutoProcessor`` + its chat template) and whose model class generates text from the processor's inputs.

A family file only says what differs (:class:`AudioTextSpec`): the model class, how an audio part is written in the
conversation, whether the family's reference prompt sends a system turn, how many audio tokens a clip becomes, and
where its language model, audio encoder and projector live when their names are not the common ones. Encoding,
generation, log-probs, teacher-forced logits and the manifest identity are shared (:class:`~.hf_runtime.HFAdapter`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import Family, LoadOptions, ModelInputError, Prompt
from speechlm_eval.models.hf_runtime import (
    HFAdapter,
    attention_kwargs,
    check_clip,
    eos_token_ids,
    resolve_device,
    resolve_dtype,
)

# Module names transformers' composite models use, tried in order when a spec does not name its own.
LANGUAGE_MODEL_NAMES = ("language_model",)
AUDIO_ENCODER_NAMES = ("audio_tower", "audio_encoder", "encoder", "audio_model")
PROJECTOR_NAMES = ("multi_modal_projector", "audio_projector", "projector", "embed_audio", "audio_adapter")
# LoRA on the language model's attention projections, whatever prefix the family's module tree puts before them.
DEFAULT_LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"


def audio_part() -> dict[str, Any]:
    """The content part a chat template reads as "an audio goes here" (the array itself is passed separately)."""
    return {"type": "audio", "audio_url": "in-memory"}


@dataclass(frozen=True)
class AudioTextSpec:
    """What one audio-text family does differently.

    Attributes:
        family: registry name (``"qwen2-audio"``).
        model_types: ``config.json`` ``model_type`` values this family claims.
        model_class: the transformers class that loads the checkpoint (a name in ``transformers``).
        system_prompt: the system turn the family's reference prompt sends explicitly when the caller gives none
            (``None``: send none, the chat template's own default applies).
        audio_tokens: audio tokens a clip of ``n_samples`` becomes, given the processor (for the too-short check and
            for sorting batches); ``None``: not known, no check.
        min_audio_tokens: the fewest audio tokens the model can take (shorter clips become error records).
        audio_first: whether the audio part precedes the text part in a turn (VoiceBench orders them so).
        max_audio_seconds: the longest clip the processor takes whole, given the processor, for families whose
            processor cuts long clips into encoder windows itself (``None``: the feature extractor's padded window).
        encode: replaces the generic ``processor(text=..., audio=...)`` call for families whose processor needs
            another path; ``(adapter, texts, audios) -> model inputs``.
        language_model / audio_encoder / projector: where those modules live, for families whose names differ from
            the common ones (``None``: found by name).
        lora_targets: regex of the modules LoRA adapts.
        extras: facts for the manifest and ``speechlm-eval families`` (e.g. the public text backbone).
        reuses_prompt_cache: whether a batch's prompt cache can be continued with other tokens after ``generate``
            (:mod:`.prompt_cache`: plain position ids, one dynamic cache), so ``gap``'s diagnostics run on top of the
            speech arm's prompts instead of encoding them again.
    """

    family: str
    model_types: tuple[str, ...]
    model_class: str
    system_prompt: str | None = None
    audio_tokens: Callable[[int, Any], int] | None = None
    min_audio_tokens: int = 1
    audio_first: bool = True
    max_audio_seconds: Callable[[Any], float | None] | None = None
    encode: Callable[["AudioTextModel", list[str], list[np.ndarray]], Mapping[str, torch.Tensor]] | None = None
    language_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    audio_encoder: Callable[[torch.nn.Module], torch.nn.Module] | None = None
    projector: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None
    lora_targets: str = DEFAULT_LORA_TARGETS
    extras: Mapping[str, Any] = field(default_factory=dict)
    reuses_prompt_cache: bool = False


def find_module(model: torch.nn.Module, names: Sequence[str]) -> torch.nn.Module | None:
    """The first submodule (breadth-first) whose attribute name is one of ``names``, in ``names`` order."""
    frontier: list[torch.nn.Module] = [model]
    while frontier:
        for name in names:
            for module in frontier:
                child = getattr(module, "_modules", {}).get(name)
                if isinstance(child, torch.nn.Module):
                    return child
        frontier = [child for module in frontier for child in module.children()]
    return None


def conversation(prompt: Prompt, spec: AudioTextSpec) -> list[dict[str, Any]]:
    """The chat messages for one prompt: a system turn per the family (or the prompt's own), then one user turn
    holding the audio part and the text part in the family's order."""
    content: list[dict[str, Any]] = []
    if prompt.audio is not None:
        content.append(audio_part())
    if prompt.text is not None:
        text = {"type": "text", "text": prompt.text}
        content.insert(len(content) if spec.audio_first else 0, text)
    system = prompt.system if prompt.system is not None else spec.system_prompt
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": content})
    return messages


def window_seconds(processor: Any) -> float | None:
    """The longest clip the feature extractor keeps whole (its padded window), ``None`` when it has no fixed one."""
    extractor = getattr(processor, "feature_extractor", None)
    n_samples = getattr(extractor, "n_samples", None)
    rate = getattr(extractor, "sampling_rate", None) or SAMPLING_RATE
    return n_samples / rate if n_samples else None


class AudioTextModel(HFAdapter):
    """A loaded audio-text checkpoint behind the :class:`~speechlm_eval.models.base.SpeechLM` interface.

    It is also a :class:`~speechlm_eval.models.base.TrainableSpeechLM`: distillation reaches the language model,
    audio encoder and projector through :meth:`language_model`, :meth:`audio_encoder` and :meth:`projector`.
    """

    accepts_audio = True
    system_with_audio = True  # whether a prompt may hold a system turn and audio together (not Voxtral's)

    def __init__(self, name: str, model: torch.nn.Module, processor: Any, spec: AudioTextSpec,
                 revision: str | None = None, tokenizer: Any = None) -> None:
        self.name = name
        self.model = model
        self.processor = processor
        self.spec = spec
        self.family = spec.family
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.tokenizer.padding_side = "left"
        self.revision = revision
        self.max_audio_seconds: float | None = (spec.max_audio_seconds(processor) if spec.max_audio_seconds
                                                else window_seconds(processor))
        self._eos_ids = eos_token_ids(model, self.tokenizer)
        self.reuses_prompt_cache = spec.reuses_prompt_cache

    # -- prompts
    def conversation(self, prompt: Prompt) -> list[dict[str, Any]]:
        return conversation(prompt, self.spec)

    def chat_text(self, prompt: Prompt) -> str:
        return self.processor.apply_chat_template(self.conversation(prompt), add_generation_prompt=True,
                                                  tokenize=False)

    def chat_token_ids(self, prompt: Prompt) -> list[int]:
        """The token ids of the prompt's chat text, each clip still its one placeholder token (no audio read)."""
        return self.tokenizer(self.chat_text(prompt), add_special_tokens=False)["input_ids"]

    def encode(self, prompts: Sequence[Prompt]) -> Mapping[str, torch.Tensor]:
        """Left-padded model inputs; all prompts of a batch must agree on having audio (the runner batches per arm)."""
        texts = [self.chat_text(p) for p in prompts]
        with_audio = [p.audio is not None for p in prompts]
        if any(with_audio) and not all(with_audio):
            raise ValueError("a batch must be all-audio or all-text prompts")
        if not any(with_audio):
            return dict(self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
        for prompt in prompts:
            self.check_audio(prompt.audio)
        audios = [np.asarray(p.audio, dtype=np.float32) for p in prompts]
        if self.spec.encode is not None:
            return self.spec.encode(self, texts, audios)
        encoded = self.processor(text=texts, audio=audios, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                                 padding=True)
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}

    def audio_token_count(self, n_samples: int) -> int | None:
        return self.spec.audio_tokens(n_samples, self.processor) if self.spec.audio_tokens else None

    def check_audio(self, audio: np.ndarray | None) -> None:
        """Refuse clips the encoder would silently truncate to its window, and clips too short to encode."""
        if audio is None:
            return
        n_tokens = self.audio_token_count(len(audio))
        check_clip(audio, max_seconds=self.max_audio_seconds, min_tokens=self.spec.min_audio_tokens,
                   n_audio_tokens=self.spec.min_audio_tokens if n_tokens is None else n_tokens)

    def prompt_length(self, prompt: Prompt) -> int:
        n = len(self.tokenizer(self.chat_text(prompt), add_special_tokens=False)["input_ids"])
        if prompt.audio is not None:
            # The placeholder becomes one token per audio token: ~25 per second of audio (not of the window).
            count = self.audio_token_count(len(prompt.audio))
            n += (count - 1) if count is not None else int(25 * len(prompt.audio) / SAMPLING_RATE)
        return n

    # -- what distillation and the diagnostics need (TrainableSpeechLM)
    def language_model(self) -> torch.nn.Module:
        found = self.spec.language_model(self.model) if self.spec.language_model else find_module(
            self.model, LANGUAGE_MODEL_NAMES)
        if found is None:
            raise ModelInputError(f"{self.family}: cannot find the language model in {type(self.model).__name__}")
        return found

    def audio_encoder(self) -> torch.nn.Module:
        found = self.spec.audio_encoder(self.model) if self.spec.audio_encoder else find_module(
            self.model, AUDIO_ENCODER_NAMES)
        if found is None:
            raise ModelInputError(f"{self.family}: cannot find the audio encoder in {type(self.model).__name__}")
        return found

    def projector(self) -> torch.nn.Module | None:
        return self.spec.projector(self.model) if self.spec.projector else find_module(self.model, PROJECTOR_NAMES)

    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    @property
    def lora_targets(self) -> str:
        return self.spec.lora_targets

    def lora_target_modules(self, pattern: str | None = None) -> list[str]:
        """Full names of the modules LoRA adapts: those matching ``pattern`` (default :attr:`lora_targets`) *inside
        the language model*. Passed to peft as names, not as the regex: peft rewrites a regex into bare leaf names
        for some architectures (MoE ones such as Qwen3-Omni), which then also match the frozen audio encoder."""
        regex = re.compile(pattern or self.lora_targets)
        inside = {id(m) for m in self.language_model().modules()}
        return [name for name, module in self.model.named_modules() if regex.fullmatch(name) and id(module) in inside]

    def describe(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"max_audio_seconds": self.max_audio_seconds}
        if self.spec.system_prompt is not None:
            extra["default_system_prompt"] = self.spec.system_prompt
        return self.describe_with(**extra)


def load_audio_text(name_or_path: str, options: LoadOptions, spec: AudioTextSpec, *,
                    processor: Any = None, tokenizer: Any = None, config: Any = None, model_class: Any = None,
                    model_kwargs: Mapping[str, Any] | None = None) -> AudioTextModel:
    """Load a checkpoint of ``spec``'s family: its processor (``AutoProcessor`` unless given) and model class
    (``model_class`` replaces ``spec.model_class``; ``model_kwargs`` go to its ``from_pretrained``)."""
    import transformers

    device = resolve_device(options.device)
    common = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    if processor is None:
        processor = transformers.AutoProcessor.from_pretrained(name_or_path, **common)
    model_class = model_class or getattr(transformers, spec.model_class)
    extra = ({"config": config} if config is not None else {}) | dict(model_kwargs or {})
    model = model_class.from_pretrained(name_or_path, dtype=resolve_dtype(options.dtype, device), **common, **extra,
                                        **attention_kwargs(options))
    model.to(device).eval()
    return AudioTextModel(name_or_path, model, processor, spec, revision=options.revision, tokenizer=tokenizer)


def audio_text_family(spec: AudioTextSpec, loader: Callable[[str, LoadOptions], AudioTextModel] | None = None,
                      capabilities: tuple[str, ...] = ("generate", "log-probs", "transcription probe", "distill"),
                      not_distillable: str | None = None) -> Family:
    """The registry entry of an audio-text family (``loader`` replaces the generic one where a family needs to;
    ``not_distillable``: why ``distill`` refuses the family, which then does not list "distill")."""
    if not_distillable is not None:
        capabilities = tuple(c for c in capabilities if c != "distill")
    return Family(name=spec.family, load=loader or (lambda path, options: load_audio_text(path, options, spec)),
                  model_types=spec.model_types, accepts_audio=True, capabilities=capabilities,
                  backbone=spec.extras.get("backbone"), notes=str(spec.extras.get("notes", "")),
                  not_distillable=not_distillable)


def length_groups(prompts: Sequence[Prompt]) -> list[list[int]]:
    """Indices of ``prompts`` grouped by clip length (first-seen order); text prompts form one group."""
    groups: dict[int | None, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(None if prompt.audio is None else len(prompt.audio), []).append(index)
    return list(groups.values())


class LengthGroupedAudio:
    """Mixin for families whose audio features depend on the rest of the batch (an encoder without a padding mask,
    a front end whose frames at a clip's end see the batch's padding): audio prompts run in sub-batches of equal
    clip length, so every answer, log-prob and logit is the one the clip gets alone. Text prompts batch as usual.
    The runner sorts the speech arm by audio length, so clips of one length still share a forward pass."""

    def generate(self, prompts: Sequence[Prompt], config: Any) -> list[Any]:
        groups = length_groups(prompts)
        if len(groups) == 1:
            return super().generate(prompts, config)  # type: ignore[misc]
        out: list[Any] = [None] * len(prompts)
        for indices in groups:
            for index, generation in zip(indices, super().generate([prompts[i] for i in indices], config)):  # type: ignore[misc]
                out[index] = generation
        return out

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[np.ndarray]:
        groups = length_groups(prompts)
        if len(groups) == 1:
            return super().continuation_logprobs(prompts, continuations)  # type: ignore[misc]
        out: list[Any] = [None] * len(prompts)
        for indices in groups:
            part = super().continuation_logprobs([prompts[i] for i in indices],  # type: ignore[misc]
                                                 [continuations[i] for i in indices])
            for index, logprobs in zip(indices, part):
                out[index] = logprobs
        return out

    def continuation_logits(self, prompts: Sequence[Prompt], continuations: Sequence[Any]):
        """As :func:`~.hf_runtime.continuation_logits`; groups are re-assembled right-aligned (left-padded)."""
        groups = length_groups(prompts)
        if len(groups) == 1 or all(len(c) == 0 for c in continuations):
            return super().continuation_logits(prompts, continuations)  # type: ignore[misc]
        parent = super()
        parts = [parent.continuation_logits([prompts[i] for i in indices],  # type: ignore[misc]
                                            [continuations[i] for i in indices]) for indices in groups]
        longest = max(logits.shape[1] for logits, _, _ in parts)
        vocab = max(logits.shape[2] for logits, _, _ in parts)
        padded_logits, padded_targets, padded_mask = [], [], []
        for logits, targets, mask in parts:
            pad = longest - logits.shape[1]
            if logits.shape[2] != vocab:  # a group whose continuations are all empty
                logits = logits.new_zeros((logits.shape[0], logits.shape[1], vocab))
            padded_logits.append(torch.nn.functional.pad(logits, (0, 0, pad, 0)))
            padded_targets.append(torch.nn.functional.pad(targets, (pad, 0)))
            padded_mask.append(torch.nn.functional.pad(mask, (pad, 0), value=False))
        order = torch.tensor([i for indices in groups for i in indices])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        device = padded_logits[0].device
        inverse = inverse.to(device)
        return (torch.cat(padded_logits)[inverse], torch.cat(padded_targets)[inverse],
                torch.cat(padded_mask)[inverse])
