"""Qwen2.5-Omni, text output only: the thinker (audio encoder + LLM) of a full checkpoint or a bare thinker.

Prompt format, after VoiceBench's ``qwen_omni`` wrapper (MatthewCYM/VoiceBench ``src/models``): one user turn whose content is
the audio alone or the text alone, with the system turn "You are a helpful assistant." sent explicitly, through the
checkpoint's chat template; items with an instruction beside the audio (MMAU) put the audio first, then the text.
Qwen's model card asks for :data:`AUDIO_OUTPUT_SYSTEM_PROMPT` when the talker should speak; only the thinker's text
is used here, so the plain prompt is kept (it is also the template's default system turn).

Inputs are built as ``Qwen2_5OmniProcessor`` builds them for text and audio (tokenizer, Whisper features padded to the
window, one ``<|AUDIO|>`` per audio token), from the tokenizer and feature extractor directly: the processor class
cannot be constructed without torchvision (its video processor), which this project does not depend on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import Family, LoadOptions, ModelLoadError, Prompt
from speechlm_eval.models.hf_runtime import HFAdapter, check_clip, eos_token_ids, resolve_device, resolve_dtype

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Required by Qwen2.5-Omni for speech output (model card); recorded for reference, not used for text output.
AUDIO_OUTPUT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)
AUDIO_TOKEN = "<|AUDIO|>"


def conversation(prompt: Prompt) -> list[dict[str, Any]]:
    """The chat messages for one prompt: the system turn (VoiceBench's unless ``prompt.system``), then the user turn."""
    content: list[dict[str, str]] = []
    if prompt.audio is not None:
        content.append({"type": "audio", "audio_url": "in-memory"})
    if prompt.text is not None:
        content.append({"type": "text", "text": prompt.text})
    system = DEFAULT_SYSTEM_PROMPT if prompt.system is None else prompt.system
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def audio_tokens_from_frames(frames: torch.Tensor) -> torch.Tensor:
    """Audio tokens per clip from its mel frame count ``(batch,)``: conv stride 2, then pooling 2 (the processor's)."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(frames)


def audio_token_count(n_samples: int, hop_length: int = 160) -> int:
    """Audio tokens the thinker gets for a clip of ``n_samples``: one mel frame per started hop."""
    frames = -(-n_samples // hop_length)
    return int(audio_tokens_from_frames(torch.tensor(frames))) if frames > 0 else 0


@dataclass(frozen=True)
class ThinkerInputFiles:
    """What the adapter reads besides the weights; ``save_pretrained`` writes it as the hub checkpoint has it.

    Stands where other families keep their processor (``adapter.processor.save_pretrained(dir)`` beside
    ``adapter.model.save_pretrained(dir)`` writes a checkpoint ``load_model`` reads back).
    """

    tokenizer: Any
    feature_extractor: Any
    chat_template: str

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.tokenizer.save_pretrained(directory)
        self.feature_extractor.save_pretrained(directory)
        (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")


class Qwen25OmniModel(HFAdapter):
    """A Qwen2.5-Omni thinker behind the :class:`~speechlm_eval.models.base.SpeechLM` interface (text output)."""

    family = "qwen2.5-omni"
    accepts_audio = True

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        tokenizer: Any,
        feature_extractor: Any,
        chat_template: str,
        revision: str | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        self.feature_extractor = feature_extractor
        self.chat_template = chat_template
        self.processor = ThinkerInputFiles(tokenizer, feature_extractor, chat_template)
        self.revision = revision
        self.max_audio_seconds: float | None = feature_extractor.n_samples / feature_extractor.sampling_rate
        self._eos_ids = eos_token_ids(model, tokenizer)

    def chat_text(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(
            conversation(prompt), chat_template=self.chat_template, add_generation_prompt=True, tokenize=False
        )

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs; all prompts of a batch must agree on having audio (the runner batches per arm).

        Returns ``input_ids``/``attention_mask`` ``(batch, len)`` and, for audio, ``input_features``
        ``(batch, mel_bins, window_frames)`` float32 with ``feature_attention_mask`` ``(batch, window_frames)``.
        """
        texts = [self.chat_text(p) for p in prompts]
        with_audio = [p.audio is not None for p in prompts]
        if any(with_audio) and not all(with_audio):
            raise ValueError("a batch must be all-audio or all-text prompts")
        if not any(with_audio):
            return dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        for prompt in prompts:
            self.check_audio(prompt.audio)
        features = self.feature_extractor(
            [np.asarray(p.audio, dtype=np.float32) for p in prompts],
            sampling_rate=SAMPLING_RATE,
            padding="max_length",  # the processor's only mode: every clip fills the window, masked
            return_attention_mask=True,
            return_tensors="pt",
        )
        frame_mask = features["attention_mask"]
        counts = audio_tokens_from_frames(frame_mask.sum(-1)).tolist()
        # One placeholder per prompt (the audio comes first in the turn), expanded to one token per audio token.
        texts = [t.replace(AUDIO_TOKEN, AUDIO_TOKEN * n, 1) for t, n in zip(texts, counts)]
        encoded = dict(self.tokenizer(texts, return_tensors="pt", padding=True))
        encoded.update(input_features=features["input_features"], feature_attention_mask=frame_mask)
        return encoded

    def check_audio(self, audio: np.ndarray | None) -> None:
        """Refuse clips the feature extractor would silently truncate to its window, and clips with no audio token."""
        if audio is not None:
            check_clip(audio, max_seconds=self.max_audio_seconds, min_tokens=1,
                       n_audio_tokens=audio_token_count(len(audio), self.feature_extractor.hop_length))

    def prompt_length(self, prompt: Prompt) -> int:
        n = len(self.tokenizer(self.chat_text(prompt))["input_ids"])
        if prompt.audio is not None:
            # The placeholder becomes one token per audio token: ~25 per second of audio (not of the window).
            n += audio_token_count(len(prompt.audio), self.feature_extractor.hop_length) - 1
        return n

    def describe(self) -> dict:
        return self.describe_with(max_audio_seconds=self.max_audio_seconds, default_system_prompt=DEFAULT_SYSTEM_PROMPT)


def thinker_config(name_or_path: str, options: LoadOptions):
    """The thinker's config: a full checkpoint's ``thinker_config``, or a bare thinker's own config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(
        name_or_path, revision=options.revision, trust_remote_code=options.trust_remote_code
    )
    if config.model_type == "qwen2_5_omni":
        return config.thinker_config
    if config.model_type == "qwen2_5_omni_thinker":
        return config
    raise ModelLoadError(f"{name_or_path!r} is a {config.model_type!r} checkpoint, not Qwen2.5-Omni")


def read_chat_template(name_or_path: str, tokenizer: Any, options: LoadOptions) -> str:
    """The processor's chat template (``chat_template.jinja``/``.json``), else the tokenizer's own."""
    from transformers import Qwen2_5OmniProcessor

    processor_dict, _ = Qwen2_5OmniProcessor.get_processor_dict(name_or_path, revision=options.revision)
    template = processor_dict.get("chat_template") or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ModelLoadError(f"{name_or_path!r} has no chat template (neither the processor's nor the tokenizer's)")
    return template


def load(name_or_path: str, options: LoadOptions) -> Qwen25OmniModel:
    """Load only the thinker: no talker/token2wav is built, and a full checkpoint's weights for them are skipped."""
    from transformers import AutoFeatureExtractor, AutoTokenizer, Qwen2_5OmniThinkerForConditionalGeneration

    device = resolve_device(options.device)
    common = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    feature_extractor = AutoFeatureExtractor.from_pretrained(name_or_path, **common)
    # transformers' weight mapping for the thinker strips the full checkpoint's "thinker." prefix.
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(
        name_or_path,
        config=thinker_config(name_or_path, options),
        dtype=resolve_dtype(options.dtype, device),
        **common,
    )
    model.to(device).eval()
    chat_template = read_chat_template(name_or_path, tokenizer, options)
    return Qwen25OmniModel(name_or_path, model, tokenizer, feature_extractor, chat_template, revision=options.revision)


FAMILY = Family(name="qwen2.5-omni", load=load, model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"), accepts_audio=True)
