"""The tokenizer of every tiny Qwen-style model built offline here (the organism's, and the tests'): a byte-level
BPE trained on local text with Qwen2's pre-tokeniser and ChatML special tokens, and the decoder sizes and ChatML ids a
Qwen2 text config built around it needs."""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def train_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = SPECIAL_TOKENS):
    """Train a byte-level BPE with Qwen2's pre-tokeniser on ``corpus`` and wrap it as a ``Qwen2Tokenizer``.

    ``special_tokens``: the first is the unknown/padding token; they take the first ids, in this order."""
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
        special_tokens=list(special_tokens),
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
        additional_special_tokens=list(special_tokens[1:]),
    )
    tokenizer.padding_side = "left"
    return tokenizer


def text_config_kwargs(spec: Any, tokenizer, max_position_embeddings: int = 2048) -> dict:
    """The decoder sizes and ChatML token ids every tiny Qwen-style LM here shares (the head is untied: Qwen2-Audio does not tie its LM head).

    ``spec`` is any object with ``hidden_size``, ``ffn_size``, ``num_layers``, ``num_heads`` and ``num_kv_heads``
    (the organism's ``TextLLMSpec``, the test fixtures' ``TinySpec``)."""
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
