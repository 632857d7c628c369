"""Tiny, offline-built Qwen2-Audio student + Qwen2 text model: test fixtures and the placeholder embedded default.

They are *randomly initialised* (the student's LM is a copy of the text model's, slightly perturbed so the two text
paths differ): their answers are meaningless, they exist to exercise the real loading, batching and scoring code on a
2-core CPU with no hub access. Everything is written with ``save_pretrained`` in the hub layout of the real models, so
``from_pretrained(path)`` loads them exactly as it loads a downloaded checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
TINY_FORMAT_VERSION = 1  # bump when the builder changes what it writes; stale caches are rebuilt


@dataclass(frozen=True)
class TinySpec:
    """Sizes of the tiny pair. ``chunk_seconds * 50`` is the encoder window in mel frames (must match the processor)."""

    vocab_size: int = 1024
    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_size: int = 128
    audio_d_model: int = 64
    audio_layers: int = 2
    chunk_seconds: int = 10
    student_noise: float = 0.02  # std of the perturbation added to the student's LM weights
    seed: int = 0


def train_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Train a byte-level BPE with Qwen2's pre-tokeniser on ``corpus`` and wrap it as a ``Qwen2Tokenizer``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(corpus), trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=model["vocab"],
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.padding_side = "left"
    return tokenizer


def text_config_kwargs(spec: Any, tokenizer, max_position_embeddings: int = 2048) -> dict:
    """The decoder sizes and ChatML token ids every tiny Qwen-style LM here shares (untied head: see feasibility).

    ``spec`` is any object with ``hidden_size``, ``ffn_size``, ``num_layers``, ``num_heads`` and ``num_kv_heads``
    (:class:`TinySpec`, the organism's ``TextLLMSpec``)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )


def build_tiny_pair(corpus: Iterable[str], out_dir: str | Path, spec: TinySpec = TinySpec()) -> tuple[Path, Path]:
    """Build and save ``out_dir/text_llm`` (Qwen2ForCausalLM) and ``out_dir/speech_llm`` (Qwen2-Audio).

    Returns the two directories. Deterministic for a given corpus and spec.
    """
    from transformers import (
        Qwen2AudioConfig,
        Qwen2AudioEncoderConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        Qwen2Config,
        Qwen2ForCausalLM,
        WhisperFeatureExtractor,
    )

    out = Path(out_dir)
    tokenizer = train_tokenizer(corpus, spec.vocab_size)
    text_config = Qwen2Config(**text_config_kwargs(spec, tokenizer))
    torch.manual_seed(spec.seed)
    teacher = Qwen2ForCausalLM(text_config).eval()

    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=80,
        encoder_layers=spec.audio_layers,
        d_model=spec.audio_d_model,
        encoder_attention_heads=4,
        encoder_ffn_dim=2 * spec.audio_d_model,
        max_source_positions=spec.chunk_seconds * 50,
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=text_config,
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    student = Qwen2AudioForConditionalGeneration(config).eval()
    student.model.language_model.load_state_dict(teacher.model.state_dict())
    student.lm_head.load_state_dict(teacher.lm_head.state_dict())
    generator = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for param in student.model.language_model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * spec.student_noise)
    for model in (teacher, student):
        model.generation_config.do_sample = False
        model.generation_config.eos_token_id = text_config.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    feature_extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=spec.chunk_seconds)
    processor = Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)

    text_dir, speech_dir = out / "text_llm", out / "speech_llm"
    teacher.save_pretrained(text_dir)
    tokenizer.save_pretrained(text_dir)
    # The text model's chat template = Qwen2's ChatML with the default system turn, as in the real Qwen2 checkpoints.
    _write_chat_template(text_dir, processor.chat_template)
    student.save_pretrained(speech_dir)
    processor.save_pretrained(speech_dir)
    for directory in (text_dir, speech_dir):
        (directory / "speechlm_eval_tiny.json").write_text(
            json.dumps({"format": TINY_FORMAT_VERSION, "spec": spec.__dict__}, sort_keys=True)
        )
    return text_dir, speech_dir


def _write_chat_template(directory: Path, template: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(directory)


def is_built(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a complete pair written by this builder version."""
    out = Path(out_dir)
    for name in ("text_llm", "speech_llm"):
        marker = out / name / "speechlm_eval_tiny.json"
        if not marker.exists() or json.loads(marker.read_text()).get("format") != TINY_FORMAT_VERSION:
            return False
    return True


def bundled_corpus() -> list[str]:
    """Every prompt, choice and reference of the bundled mini-suite: the tiny random pair's tokenizer corpus."""
    from speechlm_eval.data.registry import LoadOptions, SubsetRequest, get_benchmark

    bundled = get_benchmark("bundled")
    corpus: list[str] = []
    for subset in bundled.subsets:
        for item in bundled.load(SubsetRequest("bundled", subset), LoadOptions()):
            corpus.extend(t for t in (item.text, item.audio_instruction, item.speak, *item.choices) if t)
            if isinstance(item.reference, str):
                corpus.append(item.reference)
    return corpus


def cached_random_pair(cache_root: str | Path, name: str = "tiny-random-v1") -> tuple[Path, Path]:
    """(speech LLM, text LLM) paths of a tiny *random* pair built once under ``cache_root/models/name`` (safe when two
    processes start together). Meaningless answers; the benchmarks time the pipeline on it."""
    from filelock import FileLock

    root = Path(cache_root) / "models" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if not is_built(root):
            build_tiny_pair(bundled_corpus(), root)
    return root / "speech_llm", root / "text_llm"
