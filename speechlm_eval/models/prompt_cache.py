"""Continue a batch's prompts from the key/value cache its ``generate`` call built, instead of encoding them again.

A ``gap`` run asks the speech LLM three things of each clip: its answer (the speech arm), its next-token distributions
over a fixed response after the same prompt (the KL/JSD pass), and a transcript (the perception probe, whose prompt is
the same clip with another instruction). The three prompts share the system turn and the audio, which is almost all of
their tokens, so most of the language model's work on them is the same. :func:`generate_keeping_prompt` answers a
batch and keeps the cache of its prompts (:class:`PromptState`); :meth:`PromptState.continuation_logits` and
:meth:`PromptState.generate` then run only the tokens each row does not share with what the cache holds.

How the cache is reused: the rows are left-padded, so every prompt ends at the same column ``P``. For new token rows,
the cache is cut back (``Cache.crop``) to the first column at which some row's new tokens differ from its cached ones,
and the rest of each row (left-padded after the kept columns, where the attention mask hides the padding) is run on
top. Positions are counted along each row's attention mask, as ``generate`` counts them, so a row's cached and new
tokens keep their distances whatever the padding. The results equal those of encoding the prompts anew, up to float
rounding (tested: logits within 1e-4, greedy answers identical).

A family opts in with ``reuses_prompt_cache``, tested against a fresh forward and one-at-a-time generate: one
dynamic cache, and positions either plain or, for the multimodal-rotary Omni thinkers, the prefill's per-row offsets
(``rope_deltas``), which follow a row selection; there new prompts after the cache must be of one length. The others
(a sliding-window cache, audio run in sub-batches) run each pass from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from speechlm_eval.models.base import Generation, GenerationConfig
from speechlm_eval.models.hf_runtime import generate_batch, head_on_last_positions, left_pad, unpadded_rows


@dataclass
class PromptState:
    """The cache of one batch of left-padded prompts after ``generate``, to run more tokens after them.

    ``input_ids``/``attention_mask``: the prompts, ``(batch, P)``; ``cache``: the model's cache, holding at least the
    ``P`` prompt columns (``generate`` leaves its answer's tokens in it too; they are cut off before any reuse).
    ``encode``: the family's prompt encoder, for new prompts given as :class:`~.base.Prompt`; ``prompts`` and
    ``chat_ids`` (the prompts of the batch, and the family's token ids of a prompt's chat text, with each clip still
    one placeholder token) let a new prompt about the same clip get its ids without extracting the clip's features
    again (:func:`same_clip_rows`). ``audio_token_ids``: the ids that stand for encoder outputs; a new row whose
    uncached part holds one is refused (the features are not passed again, so the model would read the placeholder
    as a plain token). Each method changes the cache (cuts it back, then extends it), so a state serves
    one call after another, never two at once.
    """

    model: torch.nn.Module
    tokenizer: Any
    eos_token_ids: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: Any
    encode: Callable[[Sequence[Any]], Mapping[str, torch.Tensor]]
    prompts: Sequence[Any] | None = None
    chat_ids: Callable[[Any], list[int]] | None = None
    audio_token_ids: frozenset[int] = frozenset()

    @property
    def rows(self) -> list[list[int]]:
        """Each prompt's real token ids (padding removed)."""
        return unpadded_rows(self.input_ids, self.attention_mask)

    def select(self, rows: Sequence[int]) -> "PromptState":
        """A state of the given rows only (the cache is narrowed in place: this state must not be used after)."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        self.cache.batch_select_indices(index.to(_cache_device(self.cache, index.device)))
        for holder in _rope_delta_holders(self.model, self.input_ids.shape[0]):  # per-row state of mrope models
            holder.rope_deltas = holder.rope_deltas[index.to(holder.rope_deltas.device)]
        return PromptState(self.model, self.tokenizer, self.eos_token_ids, self.input_ids[index],
                           self.attention_mask[index], self.cache, self.encode,
                           [self.prompts[k] for k in rows] if self.prompts is not None else None, self.chat_ids,
                           self.audio_token_ids)

    def extend(self, new_rows: Sequence[Sequence[int]], recompute: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Cut the cache back to what every row shares with ``new_rows`` and return the full new batch.

        ``new_rows``: each row's whole token sequence (its prompt, then anything after it); ``recompute``: how many
        of each row's last tokens must be run even when cached (the positions whose outputs are wanted).
        Returns ``(input_ids, attention_mask, keep)``: the new batch, ``(batch, keep + S)``, whose first ``keep``
        columns are the cached prompt columns (the model runs only the rest).
        """
        width = self.input_ids.shape[1]
        lengths = self.attention_mask.sum(dim=1).tolist()
        keep = width
        for cached, new, n, last in zip(self.rows, new_rows, lengths, recompute):
            start = width - int(n)  # the column of the row's first real token
            shared = _common_prefix(cached, new)
            keep = min(keep, start + min(shared, len(new) - max(1, int(last))))
        keep = max(0, keep)
        tails = [list(new[max(0, keep - (width - int(n))):]) for new, n in zip(new_rows, lengths)]
        for row, tail in enumerate(tails):
            if self.audio_token_ids.intersection(tail):
                raise ValueError(f"row {row}: the new tokens differ from the cached prompt before its audio ends; "
                                 "encode the prompt anew instead")
        tail_ids, tail_mask = left_pad(tails, self.tokenizer.pad_token_id)
        device = self.input_ids.device
        input_ids = torch.cat([self.input_ids[:, :keep], tail_ids.to(device)], dim=1)
        attention_mask = torch.cat([self.attention_mask[:, :keep], tail_mask.to(device)], dim=1)
        cached_length = self.cache.get_seq_length()
        if cached_length > keep:
            self.cache.crop(keep - cached_length)  # a negative count: drop that many columns from the end
        return input_ids, attention_mask, keep

    @torch.inference_mode()
    def continuation_logits(self, continuations: Sequence[Sequence[int]]
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced next-token logits over each continuation (token ids) after its row's prompt: the contract
        of :func:`~.hf_runtime.continuation_logits` (``(batch, longest, vocab)``, right-aligned, with targets and
        mask), computed over the continuation tokens only."""
        rows = [p + list(c) for p, c in zip(self.rows, continuations)]
        longest = max((len(c) for c in continuations), default=0)
        device = next(self.model.parameters()).device
        mask = torch.zeros((len(rows), longest), dtype=torch.bool, device=device)
        for i, c in enumerate(continuations):
            if len(c):
                mask[i, longest - len(c):] = True
        input_ids, attention_mask, keep = self.extend(rows, [len(c) + 1 for c in continuations])
        if longest == 0:
            return torch.zeros((len(rows), 0, 0), device=device), input_ids[:, :0].to(device), mask
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        with head_on_last_positions(self.model, longest + 1):
            out = self.model(input_ids=input_ids[:, keep:].to(device), attention_mask=attention_mask.to(device),
                             position_ids=positions[:, keep:].to(device), cache=self.cache, use_cache=True,
                             logits_to_keep=longest + 1)
        logits = out.logits[:, -(longest + 1):-1]
        return logits, input_ids[:, -longest:].to(device), mask

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Any], config: GenerationConfig,
                 budgets: Sequence[int] | None = None) -> list[Generation]:
        """Answers to new prompts, one per row (each sharing its row's clip), as ``generate`` would give them.

        ``budgets``: each row's own new-token limit, at most ``config.max_new_tokens`` (the batch runs to the largest;
        a greedy answer's first tokens do not depend on the limit, so each row is cut to its own).
        """
        new_rows = self.same_clip_rows(prompts)
        if new_rows is None:
            encoded = self.encode(prompts)
            new_rows = unpadded_rows(encoded["input_ids"], encoded["attention_mask"])
        input_ids, attention_mask, keep = self.extend(new_rows, [1] * len(new_rows))
        if _rope_delta_holders(self.model, len(new_rows)) and len(set(attention_mask[:, keep:].sum(1).tolist())) > 1:
            # Multimodal-rotary models (the Omni thinkers) count a new token's position from its column and the
            # prefill's per-row offset, which padding between the cached and the new columns would shift.
            raise ValueError("new prompts of different lengths after the cached columns: encode them anew")
        return generate_batch(self.model, self.tokenizer, {"input_ids": input_ids, "attention_mask": attention_mask},
                              config, self.eos_token_ids, cache=self.cache, budgets=budgets)


    def same_clip_rows(self, prompts: Sequence[Any]) -> list[list[int]] | None:
        """Token ids of new prompts that each hold their row's clip, built from the cached rows: a row's audio tokens
        are the run that replaced the clip's placeholder in its chat text's ids; the new prompt's chat ids get the
        same run in place of their placeholder. ``None`` (encode them instead) where that does not hold for a row."""
        if self.prompts is None or self.chat_ids is None or len(prompts) != len(self.prompts):
            return None
        rows = []
        for cached, old, new in zip(self.rows, self.prompts, prompts):
            if new.audio is None or old.audio is not new.audio and not _same_clip(old.audio, new.audio):
                return None
            template, asked = self.chat_ids(old), self.chat_ids(new)
            at = _common_prefix(template, cached)
            extra = len(cached) - len(template)
            if at >= len(template) or extra < 0:
                return None
            placeholder, run = template[at], cached[at : at + extra + 1]
            if cached != template[:at] + run + template[at + 1:] or asked.count(placeholder) != 1:
                return None
            where = asked.index(placeholder)
            rows.append(asked[:where] + run + asked[where + 1:])
        return rows


def _same_clip(a: Any, b: Any) -> bool:
    import numpy as np

    return np.shape(a) == np.shape(b) and bool(np.array_equal(a, b))


@torch.inference_mode()
def generate_keeping_prompt(model: torch.nn.Module, tokenizer: Any, inputs: Mapping[str, torch.Tensor],
                            config: GenerationConfig, eos_token_ids: Sequence[int],
                            encode: Callable[[Sequence[Any]], Mapping[str, torch.Tensor]],
                            prompts: Sequence[Any] | None = None, chat_ids: Callable[[Any], list[int]] | None = None,
                            audio_token_ids: frozenset[int] = frozenset(),
                            ) -> tuple[list[Generation], PromptState]:
    """:func:`~.hf_runtime.generate_batch` that also returns the prompts' :class:`PromptState`."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    generations, cache = generate_batch(model, tokenizer, inputs, config, eos_token_ids, keep_cache=True)
    return generations, PromptState(model, tokenizer, list(eos_token_ids), inputs["input_ids"],
                                    inputs["attention_mask"], cache, encode,
                                    list(prompts) if prompts is not None else None, chat_ids, audio_token_ids)


def _rope_delta_holders(model: torch.nn.Module, batch: int) -> list[Any]:
    """The modules holding per-row rotary offsets from the last prefill (``rope_deltas``, ``(batch, 1)``: the
    multimodal-rotary models such as the Omni thinkers), which must follow a row selection."""
    holders = []
    for holder in (model, getattr(model, "model", None)):
        deltas = getattr(holder, "rope_deltas", None)
        if isinstance(deltas, torch.Tensor) and deltas.dim() >= 1 and deltas.shape[0] == batch:
            holders.append(holder)
    return holders


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _cache_device(cache: Any, default: torch.device) -> torch.device:
    layers = getattr(cache, "layers", None) or []
    keys = getattr(layers[0], "keys", None) if layers else None
    return keys.device if isinstance(keys, torch.Tensor) else default
