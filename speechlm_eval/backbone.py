"""Is the text LLM the speech LLM's backbone, and which tokens do the two share?

Forgetting is only the speech LLM's forgetting when the text LLM it is compared with is its own backbone (the same
architecture, with related weights). Released pairs often are not: Qwen2-Audio-7B's language model is Qwen-7B (4096
wide, 32 layers), not Qwen2-7B-Instruct (3584, 28). :func:`backbone_identity` labels the text LLM ``backbone`` or
``proxy`` from the evidence (architecture dimensions, vocabulary, and the cosine of input-embedding rows of tokens both
vocabularies share), and the report says which.

:func:`shared_vocabulary` maps the two tokenizers onto each other by token *string*: real speech tokenizers add audio
tokens, and may give an id that is an audio token in one model to another special token in the other (Qwen2.5-Omni vs
Qwen2.5-Instruct), so ids alone would compare unrelated tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ARCHITECTURE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size")
# Fine-tuning moves input embeddings little: related weights keep them far above unrelated ones (random pairs of
# embedding rows have cosine near 0). The organism's speech stage, a full fine-tune, keeps 0.99.
BACKBONE_MIN_COSINE = 0.5
EMBEDDING_SAMPLE = 4096  # shared tokens whose embedding rows are compared (the first ones by text-LLM id)


@dataclass(frozen=True)
class SharedVocabulary:
    """The tokens two tokenizers both have, as aligned id lists (``speech_ids[k]`` and ``text_ids[k]`` are one
    token string), and what only one side has.

    Attributes:
        identical: the two vocabularies are the same mapping (every id means the same string).
        conflicting: ids present in both whose strings differ (e.g. an audio token vs another special), a few shown.
    """

    speech_ids: list[int]
    text_ids: list[int]
    speech_only: int
    text_only: int
    identical: bool
    conflicting: list[dict[str, Any]]

    def describe(self) -> dict[str, Any]:
        return {"shared": len(self.speech_ids), "speech_only": self.speech_only, "text_only": self.text_only,
                "identical": self.identical, "conflicting_ids": self.conflicting}


def shared_vocabulary(speech_tokenizer: Any, text_tokenizer: Any, *, shown: int = 10) -> SharedVocabulary:
    """Align two tokenizers by token string (sorted by the speech tokenizer's id)."""
    speech, text = speech_tokenizer.get_vocab(), text_tokenizer.get_vocab()
    shared = sorted((sid, text[token]) for token, sid in speech.items() if token in text)
    by_speech_id = {i: t for t, i in speech.items()}
    conflicting = [{"id": i, "speech": by_speech_id[i], "text": t} for t, i in sorted(text.items(), key=lambda kv: kv[1])
                   if i in by_speech_id and by_speech_id[i] != t]
    return SharedVocabulary(
        speech_ids=[s for s, _ in shared], text_ids=[t for _, t in shared],
        speech_only=len(speech) - len(shared), text_only=len(text) - len(shared),
        identical=speech == text, conflicting=conflicting[:shown],
    )


def _architecture(config: Any) -> dict[str, Any]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {key: getattr(text_config, key, None) for key in (*ARCHITECTURE_KEYS, "vocab_size", "model_type")}


@torch.no_grad()
def embedding_cosine(speech_llm: Any, text_llm: Any, shared: SharedVocabulary) -> float | None:
    """Mean cosine of the two models' input-embedding rows over (up to :data:`EMBEDDING_SAMPLE`) shared tokens;
    ``None`` when the widths differ (unrelated by construction) or nothing is shared."""
    speech_embed = speech_llm.language_model().get_input_embeddings().weight
    text_embed = text_llm.model.get_input_embeddings().weight
    if speech_embed.shape[1] != text_embed.shape[1] or not shared.speech_ids:
        return None
    pairs = sorted(zip(shared.text_ids, shared.speech_ids))[:EMBEDDING_SAMPLE]
    text_rows = text_embed[[t for t, _ in pairs]].float().cpu()
    speech_rows = speech_embed[[s for _, s in pairs]].float().cpu()
    return float(torch.nn.functional.cosine_similarity(text_rows, speech_rows, dim=-1).mean())


def backbone_identity(speech_llm: Any, text_llm: Any) -> dict[str, Any]:
    """``{"label": "backbone"|"proxy", "reason", "speech_lm", "text_llm", "embedding_cosine", "vocabulary"}``.

    ``backbone`` needs the same architecture dimensions and an embedding cosine of at least
    :data:`BACKBONE_MIN_COSINE` on shared tokens; anything else is a ``proxy``, and forgetting measured against it is
    the distance to another model, not what the speech LLM lost.
    """
    shared = shared_vocabulary(speech_llm.tokenizer, text_llm.tokenizer)
    speech_arch = _architecture(speech_llm.language_model().config)
    text_arch = _architecture(text_llm.model.config)
    differing = [k for k in ARCHITECTURE_KEYS if speech_arch.get(k) != text_arch.get(k)]
    cosine = embedding_cosine(speech_llm, text_llm, shared)
    if differing:
        label, reason = "proxy", "different architecture (" + ", ".join(
            f"{k} {speech_arch[k]} vs {text_arch[k]}" for k in differing) + ")"
    elif cosine is None or cosine < BACKBONE_MIN_COSINE:
        label = "proxy"
        reason = ("same architecture, unrelated weights (input-embedding cosine "
                  + ("n/a" if cosine is None else f"{cosine:.3f}") + f" < {BACKBONE_MIN_COSINE} on shared tokens)")
    else:
        label, reason = "backbone", f"same architecture, related weights (input-embedding cosine {cosine:.3f})"
    return {"label": label, "reason": reason, "speech_lm": speech_arch, "text_llm": text_arch,
            "embedding_cosine": cosine, "vocabulary": shared.describe()}
