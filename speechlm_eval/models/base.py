"""The one narrow interface the runner drives: generate for a batch of prompts, and log-probs of continuations."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np



@dataclass(frozen=True)
class Prompt:
    """One user turn.

    Attributes:
        text: the user's text (the whole turn in text arms; an instruction beside the audio for MMAU-style items).
        audio: 16 kHz mono float32 samples, shape ``(n_samples,)``; placed before ``text`` in the turn, as Qwen2-Audio
            and VoiceBench order them.
        system: a system message; ``None`` keeps the chat template's default (Qwen2-Audio's "You are a helpful
            assistant."), which is what VoiceBench sends.
    """

    text: str | None = None
    audio: np.ndarray | None = None
    system: str | None = None

    def __post_init__(self) -> None:
        if self.text is None and self.audio is None:
            raise ValueError("a Prompt needs text, audio or both")


DEFAULT_MAX_NEW_TOKENS = 512
# A key of ``GenerationConfig.extra``: let the checkpoint's generation_config.json fill every setting left unset (what
# VoiceBench's wrappers do by passing no sampling arguments); off by default, so greedy means greedy.
CHECKPOINT_DEFAULTS = "checkpoint_defaults"


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings; greedy by default. Written to the run manifest.

    Nothing else applies: a checkpoint's ``generation_config.json`` leftovers (``repetition_penalty``,
    ``no_repeat_ngram_size``, sampling, ...) are ignored unless asked for here. ``extra`` holds further transformers
    generation arguments (``--gen-kwargs k=v,...``, or a preset's), passed as given; ``max_length`` there caps prompt
    plus answer, as VoiceBench's Qwen2-Audio wrapper does.
    """

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    extra: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        extra = out.pop("extra")
        if extra:
            out["extra"] = dict(extra)
        return out


@dataclass(frozen=True)
class Generation:
    """A model's answer to one prompt."""

    text: str
    n_prompt_tokens: int
    n_new_tokens: int
    finish_reason: Literal["eos", "length"]


class ModelInputError(ValueError):
    """A prompt the model cannot take as given (e.g. audio longer than the encoder window)."""


class ModelLoadError(ValueError):
    """A model that cannot be loaded: unknown path/id, unknown family, missing files."""


@dataclass(frozen=True)
class LoadOptions:
    """How to load a checkpoint. ``device``/``dtype`` accept "auto"."""

    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None  # transformers' name ("sdpa", "eager", ...); None: transformers' choice


@dataclass(frozen=True)
class Family:
    """A model family: a loader and the ``config.json`` ``model_type`` values it claims.

    A family is one file that defines ``FAMILY = Family(...)`` and one row in
    :data:`speechlm_eval.models.registry.FAMILIES`.
    """

    name: str
    load: "Callable[[str, LoadOptions], SpeechLM]"
    model_types: tuple[str, ...] = ()
    accepts_audio: bool = True
    capabilities: tuple[str, ...] = ("generate", "log-probs")
    backbone: str | None = None  # the public text checkpoint its language model is, for the forgetting reference
    notes: str = ""
    not_distillable: str | None = None  # why ``distill`` refuses every checkpoint of the family (None: it does not)


@runtime_checkable
class SpeechLM(Protocol):
    """What every model family implements. Batching, padding and prompt formatting live behind it.

    Attributes:
        name: the id or path it was loaded from.
        accepts_audio: whether prompts may carry audio.
        max_audio_seconds: the longest clip the audio encoder sees whole (``None`` = no limit / no audio).
    """

    name: str
    accepts_audio: bool
    max_audio_seconds: float | None

    def generate(self, prompts: Sequence[Prompt], config: GenerationConfig) -> list[Generation]:
        """Answer each prompt; one batch, order preserved."""
        ...

    def continuation_logprobs(self, prompts: Sequence[Prompt], continuations: Sequence[str]) -> list[np.ndarray]:
        """Log-probabilities of each continuation's tokens given its prompt (as the assistant's reply).

        Returns one float32 array per pair, shape ``(n_continuation_tokens,)``.
        """
        ...

    def continuation_logits(self, prompts: Sequence[Prompt], continuations: Sequence[str] | Sequence[Sequence[int]]):
        """Teacher-forced next-token logits over each continuation (differentiable).

        Returns ``(logits (batch, longest, vocab), targets (batch, longest), mask (batch, longest) bool)`` with the
        continuations right-aligned; see :func:`speechlm_eval.models.hf_runtime.continuation_logits`.
        """
        ...

    def prompt_length(self, prompt: Prompt) -> int:
        """Approximate input length in tokens (audio included), used to sort batches."""
        ...

    def describe(self) -> dict:
        """JSON-safe identity for the manifest: family, id/path, revision, dtype, device, parameter count."""
        ...


@runtime_checkable
class TrainableSpeechLM(SpeechLM, Protocol):
    """What distillation (and the diagnostics comparing two models) need beyond :class:`SpeechLM`, so no caller
    reaches into a family's module tree.

    Attributes:
        model: the whole ``torch.nn.Module`` that is trained and saved.
        tokenizer: the model's tokenizer (its vocabulary decides which ids two models share).
        processor: what is saved beside the weights so that ``load_model`` reads the checkpoint back.
        lora_targets: regex of the language model's modules LoRA adapts.
    """

    model: Any
    tokenizer: Any
    processor: Any
    lora_targets: str

    def language_model(self) -> Any:
        """The decoder that turns embeddings into hidden states (trained by distillation)."""
        ...

    def audio_encoder(self) -> Any:
        """The audio encoder (always frozen by distillation)."""
        ...

    def projector(self) -> Any:
        """The audio-to-LLM projector, or ``None`` when the family has none."""
        ...

    def lm_head(self) -> Any:
        """The output embedding (vocabulary projection)."""
        ...

    def lora_target_modules(self, pattern: str | None = None) -> list[str]:
        """Full names of the language-model modules LoRA adapts (``pattern`` default: :attr:`lora_targets`)."""
        ...
