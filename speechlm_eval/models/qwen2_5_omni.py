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
from typing import Any

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models import audio_text
from speechlm_eval.models.audio_text import AudioTextModel, AudioTextSpec, audio_text_family, load_audio_text
from speechlm_eval.models.base import LoadOptions, ModelLoadError, Prompt

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# Required by Qwen2.5-Omni for speech output (model card); recorded for reference, not used for text output.
AUDIO_OUTPUT_SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)
AUDIO_TOKEN = "<|AUDIO|>"


def conversation(prompt: Prompt) -> list[dict[str, Any]]:
    """The chat messages for one prompt: the system turn (VoiceBench's unless ``prompt.system``), then the user turn."""
    return audio_text.conversation(prompt, SPEC)


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

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any:
        """The checkpoint's chat template rendered as ``Qwen2_5OmniProcessor.apply_chat_template`` renders it."""
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, **kwargs)


def encode_audio(adapter: AudioTextModel, texts: list[str], audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Inputs as ``Qwen2_5OmniProcessor`` builds them for text and audio: Whisper features padded to the window,
    one ``<|AUDIO|>`` per audio token.

    Returns ``input_ids``/``attention_mask`` ``(batch, len)`` and ``input_features`` ``(batch, mel_bins,
    window_frames)`` float32 with ``feature_attention_mask`` ``(batch, window_frames)``.
    """
    extractor = adapter.processor.feature_extractor
    features = extractor(
        audios,
        sampling_rate=SAMPLING_RATE,
        padding="max_length",  # the processor's only mode: every clip fills the window, masked
        return_attention_mask=True,
        return_tensors="pt",
    )
    frame_mask = features["attention_mask"]
    counts = audio_tokens_from_frames(frame_mask.sum(-1)).tolist()
    # One placeholder per prompt (the audio comes first in the turn), expanded to one token per audio token.
    texts = [t.replace(AUDIO_TOKEN, AUDIO_TOKEN * n, 1) for t, n in zip(texts, counts)]
    encoded = dict(adapter.tokenizer(texts, return_tensors="pt", padding=True))
    encoded.update(input_features=features["input_features"], feature_attention_mask=frame_mask)
    return encoded


def _audio_tokens(n_samples: int, processor: Any) -> int:
    return audio_token_count(n_samples, processor.feature_extractor.hop_length)


SPEC = AudioTextSpec(
    family="qwen2.5-omni",
    model_types=("qwen2_5_omni", "qwen2_5_omni_thinker"),
    model_class="Qwen2_5OmniThinkerForConditionalGeneration",
    system_prompt=DEFAULT_SYSTEM_PROMPT,
    audio_tokens=_audio_tokens,
    min_audio_tokens=1,
    encode=encode_audio,
    extras={"backbone": "Qwen/Qwen2.5-7B (3B: Qwen/Qwen2.5-3B); -Instruct is the matching chat model",
            "notes": "the thinker only (text output); its language model is initialised from Qwen2.5"},
    reuses_prompt_cache=True,
)


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


def load(name_or_path: str, options: LoadOptions) -> AudioTextModel:
    """Load only the thinker: no talker/token2wav is built, and a full checkpoint's weights for them are skipped."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    common = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    feature_extractor = AutoFeatureExtractor.from_pretrained(name_or_path, **common)
    chat_template = read_chat_template(name_or_path, tokenizer, options)
    # transformers' weight mapping for the thinker strips the full checkpoint's "thinker." prefix.
    return load_audio_text(name_or_path, options, SPEC, processor=ThinkerInputFiles(tokenizer, feature_extractor,
                                                                                     chat_template),
                           tokenizer=tokenizer, config=thinker_config(name_or_path, options))


FAMILY = audio_text_family(SPEC, load)
