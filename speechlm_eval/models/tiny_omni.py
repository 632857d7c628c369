"""Tiny, offline-built Qwen2.5-Omni student + Qwen2 text teacher with the same tokenizer: test fixtures.

The Qwen2.5-Omni counterpart of :mod:`speechlm_eval.models.tiny` (same corpus-trained tokenizer, same ``TinySpec``
sizes, same conventions): randomly initialised, meaningless answers, real loading code. The student is saved the way
the hub ships ``Qwen/Qwen2.5-Omni-7B`` (``model_type`` ``qwen2_5_omni``, one ``config.json`` holding the thinker, talker
and token2wav configs, weights prefixed ``thinker.``/``talker.``/``token2wav.``), or with ``thinker_only=True`` as a
bare thinker (``model_type`` ``qwen2_5_omni_thinker``). The thinker's language model is a copy of the teacher's,
perturbed by ``spec.student_noise`` (with 0 the two answer text prompts identically: M-RoPE on text-only positions is
plain RoPE).

No ``Qwen2_5OmniProcessor`` is saved: it needs a video processor, which needs torchvision (not a dependency here).
What the adapter reads is saved instead: the tokenizer (with the multimodal token names the processor expects), the
Whisper feature extractor and the chat template (``chat_template.jinja``, as the hub checkpoint's processor has it).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from speechlm_eval.models.tiny import TinySpec, text_config_kwargs, train_tokenizer

TINY_OMNI_FORMAT_VERSION = 1  # bump when the builder changes what it writes

# Named multimodal tokens, as in Qwen2.5-Omni's tokenizer_config.json; the processor reads them by these names.
MULTIMODAL_TOKENS = {
    "audio_token": "<|AUDIO|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
}

# The chat template of Qwen/Qwen2.5-Omni-7B (also in transformers' Qwen2.5-Omni processor tests): a default system
# turn "You are a helpful assistant." when the conversation has none; media parts become <|x_bos|><|X|><|x_eos|>.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}{% set image_count = namespace(value=0) %}"
    "{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}{% if add_audio_id %}Audio {{ audio_count.value }}: "
    "{% endif %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_bos|><|VIDEO|><|vision_eos|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def omni_tokenizer(corpus: Iterable[str], vocab_size: int, work_dir: Path) -> Any:
    """``tiny.train_tokenizer`` plus the vision tokens and the named multimodal tokens of Qwen2.5-Omni's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = train_tokenizer(corpus, vocab_size)
    extra = [t for t in MULTIMODAL_TOKENS.values() if t not in tokenizer.get_vocab()]
    tokenizer.add_special_tokens({"extra_special_tokens": extra}, replace_extra_special_tokens=False)
    tokenizer.save_pretrained(work_dir)
    # Reloading with the names registers them as model-specific special tokens (tokenizer.audio_token, ...).
    tokenizer = AutoTokenizer.from_pretrained(work_dir, **MULTIMODAL_TOKENS)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_omni_pair(
    corpus: Iterable[str], out_dir: str | Path, spec: TinySpec = TinySpec(), *, thinker_only: bool = False
) -> tuple[Path, Path]:
    """Build and save ``out_dir/text_llm`` (Qwen2ForCausalLM) and ``out_dir/speech_llm`` (Qwen2.5-Omni).

    Returns the two directories, in ``tiny.build_tiny_pair``'s order. Deterministic for a given corpus and spec.
    """
    from transformers import (
        Qwen2_5OmniAudioEncoderConfig,
        Qwen2_5OmniConfig,
        Qwen2_5OmniForConditionalGeneration,
        Qwen2_5OmniTextConfig,
        Qwen2_5OmniThinkerConfig,
        Qwen2_5OmniVisionEncoderConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        WhisperFeatureExtractor,
    )

    out = Path(out_dir)
    text_dir, speech_dir = out / "text_llm", out / "speech_llm"
    with tempfile.TemporaryDirectory() as work_dir:
        tokenizer = omni_tokenizer(corpus, spec.vocab_size, Path(work_dir))
    token_id = tokenizer.convert_tokens_to_ids
    head_dim = spec.hidden_size // spec.num_heads
    rope_theta = 1_000_000.0
    shared = text_config_kwargs(spec, tokenizer)
    torch.manual_seed(spec.seed)
    teacher = Qwen2ForCausalLM(
        Qwen2Config(**shared, rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    ).eval()

    # M-RoPE splits the head's rotary half-dimension into (time, height, width) sections; 7B: [16, 24, 24] of 64.
    half, side = head_dim // 2, 3 * head_dim // 16
    mrope = {"rope_type": "default", "rope_theta": rope_theta, "mrope_section": [half - 2 * side, side, side]}
    ids = dict(
        audio_token_index=token_id("<|AUDIO|>"),
        image_token_index=token_id("<|IMAGE|>"),
        video_token_index=token_id("<|VIDEO|>"),
        audio_start_token_id=token_id("<|audio_bos|>"),
        audio_end_token_id=token_id("<|audio_eos|>"),
        vision_start_token_id=token_id("<|vision_bos|>"),
        vision_end_token_id=token_id("<|vision_eos|>"),
    )
    thinker_config = Qwen2_5OmniThinkerConfig(
        text_config=Qwen2_5OmniTextConfig(**shared, rope_parameters=mrope),
        audio_config=Qwen2_5OmniAudioEncoderConfig(
            num_mel_bins=128,
            encoder_layers=spec.audio_layers,
            d_model=spec.audio_d_model,
            encoder_attention_heads=4,
            encoder_ffn_dim=2 * spec.audio_d_model,
            output_dim=spec.hidden_size,
        ),
        vision_config=Qwen2_5OmniVisionEncoderConfig(
            depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=spec.hidden_size,
            fullatt_block_indexes=[0],
        ),
        user_token_id=tokenizer("user", add_special_tokens=False)["input_ids"][0],
        pad_token_id=tokenizer.pad_token_id,
        **ids,
    )
    config = Qwen2_5OmniConfig(
        thinker_config=thinker_config,
        talker_config=_tiny_talker_config(spec, mrope),
        token2wav_config=_tiny_token2wav_config(),
        enable_audio_output=True,
    )
    omni = Qwen2_5OmniForConditionalGeneration(config).eval()
    language_model = omni.thinker.model.language_model
    language_model.load_state_dict(teacher.model.state_dict())
    omni.thinker.lm_head.load_state_dict(teacher.lm_head.state_dict())
    generator = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for param in language_model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * spec.student_noise)
    student = omni.thinker if thinker_only else omni
    for model in (teacher, student):
        model.generation_config.do_sample = False
        model.generation_config.eos_token_id = shared["eos_token_id"]
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    teacher.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    student.save_pretrained(speech_dir)
    tokenizer.save_pretrained(speech_dir)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=128, chunk_length=spec.chunk_seconds, return_attention_mask=True
    )
    _write_preprocessor_config(speech_dir, feature_extractor)
    for directory in (text_dir, speech_dir):
        (directory / "speechlm_eval_tiny.json").write_text(
            json.dumps(
                {"format": TINY_OMNI_FORMAT_VERSION, "spec": spec.__dict__, "thinker_only": thinker_only},
                sort_keys=True,
            )
        )
    return text_dir, speech_dir


def _write_preprocessor_config(directory: Path, feature_extractor: Any) -> None:
    """One ``preprocessor_config.json`` for the image processor and the audio feature extractor, as on the hub.

    Qwen2.5-Omni's audio front end is Whisper's with 128 mel bins; the hub's window is 300 s, the tiny one
    ``spec.chunk_seconds``. The image keys are the stock Qwen2-VL values (the adapter never reads them).
    """
    image_processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "min_pixels": 3136,
        "max_pixels": 12845056,
        "patch_size": 14,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    merged = {**image_processor, **feature_extractor.to_dict(), "processor_class": "Qwen2_5OmniProcessor"}
    (directory / "preprocessor_config.json").write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")


def _tiny_talker_config(spec: TinySpec, mrope: dict) -> Any:
    """A minimal talker: never run, present so the checkpoint carries ``talker.*`` weights as the hub's does."""
    from transformers import Qwen2_5OmniTalkerConfig

    codec_vocab = 64
    return Qwen2_5OmniTalkerConfig(
        vocab_size=codec_vocab,
        embedding_size=spec.hidden_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=spec.hidden_size // spec.num_heads,
        rope_parameters=mrope,
        tts_codec_start_token_id=codec_vocab - 4,
        tts_codec_end_token_id=codec_vocab - 3,
        tts_codec_pad_token_id=codec_vocab - 2,
        tts_codec_mask_token_id=codec_vocab - 1,
        # Thinker-vocabulary ids, which the config validates against the codec vocabulary and warns about; the
        # talker never runs here, so any in-range value keeps the logs quiet.
        tts_text_start_token_id=0,
        tts_text_end_token_id=0,
        tts_text_pad_token_id=0,
        vision_start_token_id=0,
        vision_end_token_id=0,
        audio_start_token_id=0,
        audio_end_token_id=0,
    )


def _tiny_token2wav_config() -> Any:
    """A minimal DiT + BigVGAN codec-to-waveform model: never run, present for the ``token2wav.*`` weights."""
    from transformers import Qwen2_5OmniBigVGANConfig, Qwen2_5OmniDiTConfig, Qwen2_5OmniToken2WavConfig

    dit = Qwen2_5OmniDiTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=16, emb_dim=16, num_embeds=64,
        enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8, enc_se_channels=8,
        look_ahead_layers=[0], look_backward_layers=[0],
    )
    bigvgan = Qwen2_5OmniBigVGANConfig(
        upsample_initial_channel=16, resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3, 5]],
        upsample_rates=[2], upsample_kernel_sizes=[4],
    )
    return Qwen2_5OmniToken2WavConfig(dit_config=dit, bigvgan_config=bigvgan)
