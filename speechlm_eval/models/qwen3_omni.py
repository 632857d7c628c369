"""Qwen3-Omni, text output only: the thinker (AuT audio encoder + MoE LLM) of a full checkpoint
(``Qwen/Qwen3-Omni-30B-A3B-Instruct``, ``model_type`` ``qwen3_omni_moe``) or a bare thinker (``qwen3_omni_moe_thinker``).

Prompt format: the checkpoint's chat template (``chat_template.json``/``.jinja``), ChatML with no default system turn;
an audio part becomes ``<|audio_start|><|audio_pad|><|audio_end|>`` in place, the text follows it unchanged::

    <|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|>Which choice?<|im_end|>\\n<|im_start|>assistant\\n

The model card's system prompt ("You are Qwen, a virtual human developed by the Qwen Team, ...") is required for
speech output only; for text output its examples send none, and neither is one sent here. Items with an instruction
beside the audio put the audio first, as the card's examples and VoiceBench do.

Inputs are built as ``Qwen3OmniMoeProcessor`` builds them for text and audio (tokenizer; Whisper features padded to
the longest clip, never truncated; one ``<|audio_pad|>`` per audio token), from the tokenizer and feature extractor
directly: the processor class cannot be constructed without an image and a video processor, and the video processor
needs torchvision, which this project does not depend on.

Audio tokens: the encoder works on 1 s chunks (``n_window * 2`` = 100 mel frames) with no positional limit, 13 tokens
per full chunk, so there is no encoder window: the feature extractor's ``n_samples`` (300 s on the hub) truncates
nothing here. A clip is refused only when its audio tokens alone exceed the thinker's context
(``text_config.max_position_embeddings``, one position per audio token).

Distillation note: peft (0.21) rewrites a regex ``target_modules`` of an MoE model into bare leaf names
(``q_proj``, ...), which also match the audio encoder's attention; distillation therefore hands peft the regex's
matches inside the language model by full name (``AudioTextModel.lora_target_modules``), tested in
``tests/models/test_qwen3_omni.py``.

Backbone: the thinker's language model is initialised from Qwen3 (Qwen3-Omni technical report) and has
Qwen3-30B-A3B's shape (MoE, hidden 2048, 48 layers, 32 heads, 4 KV heads, 128 experts, 8 active), with a
vocabulary of 152064 against Qwen3's 151936: compare against ``Qwen/Qwen3-30B-A3B`` (base) or
``Qwen/Qwen3-30B-A3B-Instruct-2507`` (chat); after Qwen3-Omni's multimodal training the backbone check decides.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.audio_text import AudioTextModel, AudioTextSpec, audio_text_family, load_audio_text
from speechlm_eval.models.base import LoadOptions, ModelInputError, ModelLoadError
from speechlm_eval.models.qwen2_5_omni import ThinkerInputFiles, read_chat_template

AUDIO_TOKEN = "<|audio_pad|>"
N_WINDOW = 50  # Qwen3OmniMoeProcessor.n_window: half a chunk in mel frames (the hub config's audio_config.n_window)


def audio_tokens_from_frames(frames: torch.Tensor, n_window: int = N_WINDOW) -> torch.Tensor:
    """Audio tokens per clip from its mel frame count: 13 per full ``2 * n_window``-frame chunk plus the tail's
    three stride-2 convolutions (the processor's and the encoder's ``_get_feat_extract_output_lengths``)."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(frames, n_window)


def audio_token_count(n_samples: int, processor: Any) -> int:
    """Audio tokens the thinker gets for a clip of ``n_samples``: one mel frame per started hop."""
    frames = -(-n_samples // processor.feature_extractor.hop_length)
    return int(audio_tokens_from_frames(torch.tensor(frames))) if frames > 0 else 0


class Qwen3OmniModel(AudioTextModel):
    """The generic adapter plus the thinker's bounds on audio: at least half an FFT window of samples, and no more
    audio tokens than the thinker's context (see the module docstring)."""

    @property
    def max_context(self) -> int:
        return int(self.model.config.get_text_config().max_position_embeddings)

    def check_audio(self, audio: np.ndarray | None) -> None:
        super().check_audio(audio)
        if audio is None:
            return
        shortest = self.processor.feature_extractor.n_fft // 2 + 1
        if len(audio) < shortest:
            # The feature extractor pads only to the batch's longest clip, and its reflect padding fails on a clip
            # shorter than half an FFT window: such a clip alone in a batch cannot be encoded at all.
            raise ModelInputError(f"audio is {len(audio)} samples long, too short to encode "
                                  f"(the feature extractor needs at least {shortest})")
        n_tokens = self.audio_token_count(len(audio))
        if n_tokens > self.max_context:
            raise ModelInputError(
                f"audio is {len(audio) / SAMPLING_RATE:.2f} s long: {n_tokens} audio tokens exceed the thinker's "
                f"context of {self.max_context} positions")


def encode_audio(adapter: AudioTextModel, texts: list[str], audios: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Inputs as ``Qwen3OmniMoeProcessor`` builds them for text and audio.

    Returns ``input_ids``/``attention_mask`` ``(batch, len)`` (left-padded), ``input_features`` ``(batch, 128,
    longest_frames)`` float32 and ``feature_attention_mask`` ``(batch, longest_frames)``.
    """
    features = adapter.processor.feature_extractor(
        audios,
        sampling_rate=SAMPLING_RATE,
        padding=True,  # the processor's: to the longest clip of the batch, masked
        truncation=False,
        return_attention_mask=True,
        return_tensors="pt",
    )
    frame_mask = features["attention_mask"]
    counts = audio_tokens_from_frames(frame_mask.sum(-1)).tolist()
    # One placeholder per prompt, expanded to one token per audio token.
    texts = [t.replace(AUDIO_TOKEN, AUDIO_TOKEN * n, 1) for t, n in zip(texts, counts)]
    encoded = dict(adapter.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))
    encoded.update(input_features=features["input_features"], feature_attention_mask=frame_mask)
    return encoded


def no_window(processor: Any) -> None:
    """No encoder window: the processor pads to the longest clip and truncates nothing."""
    return None


SPEC = AudioTextSpec(
    family="qwen3-omni",
    model_types=("qwen3_omni_moe", "qwen3_omni_moe_thinker"),
    model_class="Qwen3OmniMoeThinkerForConditionalGeneration",
    system_prompt=None,  # text output: the card's examples send none; the template has no default
    audio_tokens=audio_token_count,
    min_audio_tokens=1,
    max_audio_seconds=no_window,
    encode=encode_audio,
    extras={"backbone": "Qwen/Qwen3-30B-A3B (-Instruct-2507 is the matching chat model)",
            "notes": "the thinker only (text output); its MoE language model is initialised from Qwen3 "
                     "(30B-A3B shape), vocabulary 152064 vs Qwen3's 151936"},
    reuses_prompt_cache=True,
)


def thinker_config(name_or_path: str, options: LoadOptions):
    """The thinker's config: a full checkpoint's ``thinker_config``, or a bare thinker's own config."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path, revision=options.revision,
                                        trust_remote_code=options.trust_remote_code)
    if config.model_type == "qwen3_omni_moe":
        return config.thinker_config
    if config.model_type == "qwen3_omni_moe_thinker":
        return config
    raise ModelLoadError(f"{name_or_path!r} is a {config.model_type!r} checkpoint, not Qwen3-Omni")


def load(name_or_path: str, options: LoadOptions) -> Qwen3OmniModel:
    """Load only the thinker: no talker/code2wav is built, and a full checkpoint's weights for them are skipped."""
    from transformers import AutoFeatureExtractor, AutoTokenizer

    common = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    feature_extractor = AutoFeatureExtractor.from_pretrained(name_or_path, **common)
    chat_template = read_chat_template(name_or_path, tokenizer, options)
    inputs = ThinkerInputFiles(tokenizer, feature_extractor, chat_template)
    # transformers' weight mapping for the thinker strips the full checkpoint's "thinker." prefix.
    generic = load_audio_text(name_or_path, options, SPEC, processor=inputs, tokenizer=tokenizer,
                              config=thinker_config(name_or_path, options))
    return Qwen3OmniModel(name_or_path, generic.model, inputs, SPEC, revision=options.revision, tokenizer=tokenizer)


FAMILY = audio_text_family(SPEC, load)
