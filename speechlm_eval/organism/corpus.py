"""Training text of the organism: the tokenizer corpus, chat-formatted examples and padded training batches.

Every prompt is rendered with the same chat template and message structure the project's adapters use at evaluation
time (``models/hf_causal.py`` for the text LLM, ``models/qwen2_audio.py::conversation`` for the speech LLM), so a
trained skill is exercised in exactly the format ``speechlm-eval gap`` sends. Loss falls on the response tokens and
the closing ``<|im_end|>`` only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from speechlm_eval.diagnostics import PROBE_INSTRUCTION
from speechlm_eval.models.base import Prompt
from speechlm_eval.models.qwen2_audio import conversation
from speechlm_eval.data.organism_world import ATTRIBUTES, LETTERS, MCQ, Fact, World, mcq_renderings, render_mcq

REPEAT_PREFIX = "Repeat: "  # the text-LLM task that lets a frozen LM emit question text (needed by stage A's ASR)
AUDIO_TOKEN = "<|AUDIO|>"
IM_END = "<|im_end|>"
IGNORE_INDEX = -100


@dataclass(frozen=True)
class TextExample:
    """One chat exchange: the user's text and the assistant's reply."""

    prompt: str
    response: str


def mcq_example(mcq: MCQ) -> TextExample:
    return TextExample(mcq.prompt, mcq.response)


def short_example(fact: Fact) -> TextExample:
    return TextExample(fact.question(), fact.value)


def repeat_example(text: str) -> TextExample:
    return TextExample(REPEAT_PREFIX + text, text)


def tokenizer_corpus(world: World) -> list[str]:
    """Text the BPE is trained on: MCQ renderings and short questions of every fact, answers, Repeat lines and the
    fixed chat/probe strings, so every world word and every answer is a single token."""
    mcqs = mcq_renderings(world.facts)
    corpus = [m.prompt for m in mcqs] + [m.response for m in mcqs]
    corpus += [f.question() for f in world.facts]
    corpus += [REPEAT_PREFIX + f.question() for f in world.facts]
    corpus += list(LETTERS) + [v for a in ATTRIBUTES for v in a.values]
    corpus += [PROBE_INSTRUCTION, "You are a helpful assistant.", "system", "user", "assistant", "Audio 1: "]
    return corpus


def chat_text(tokenizer: Any, text: str) -> str:
    """The text LLM's prompt string, exactly as ``CausalLMModel.chat_text`` renders a user turn."""
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)


def speech_chat_text(processor: Any, text: str | None, with_audio: bool) -> str:
    """The speech LLM's prompt string (one ``<|AUDIO|>`` placeholder), as ``Qwen2AudioModel.chat_text`` renders it."""
    prompt = Prompt(text=text, audio=np.zeros(1, dtype=np.float32) if with_audio else None)
    return processor.apply_chat_template(conversation(prompt), add_generation_prompt=True, tokenize=False)


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """The reply's tokens followed by ``<|im_end|>`` (what greedy decoding must produce before it stops)."""
    return tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids(IM_END)]


def encode_text_example(tokenizer: Any, example: TextExample) -> tuple[list[int], list[int]]:
    """``(prompt_ids, response_ids)`` of one text exchange."""
    prompt = tokenizer(chat_text(tokenizer, example.prompt), add_special_tokens=False)["input_ids"]
    return prompt, response_ids(tokenizer, example.response)


@dataclass(frozen=True)
class AudioPromptTemplate:
    """Token ids of a speech prompt around its audio: ``before + [<|AUDIO|>] * n_audio_tokens + after``."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    audio_token_id: int

    def ids(self, n_audio_tokens: int) -> list[int]:
        return [*self.before, *([self.audio_token_id] * n_audio_tokens), *self.after]


def audio_prompt_template(processor: Any, instruction: str | None) -> AudioPromptTemplate:
    """Split the rendered speech prompt at its single ``<|AUDIO|>``; ``instruction`` = text after the audio, if any.

    The processor expands that placeholder to one token per audio frame of the encoder's output; doing the expansion
    here lets clips be featurised once and batched many times.
    """
    tokenizer = processor.tokenizer
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    ids = tokenizer(speech_chat_text(processor, instruction, with_audio=True), add_special_tokens=False)["input_ids"]
    if ids.count(audio_id) != 1:
        raise ValueError("the speech prompt must hold exactly one audio placeholder")
    cut = ids.index(audio_id)
    return AudioPromptTemplate(tuple(ids[:cut]), tuple(ids[cut + 1 :]), audio_id)


def asr_template(processor: Any) -> AudioPromptTemplate:
    """The perception probe's prompt: audio first, then :data:`PROBE_INSTRUCTION`, in one user turn."""
    return audio_prompt_template(processor, PROBE_INSTRUCTION)


def spoken_qa_template(processor: Any) -> AudioPromptTemplate:
    """VoiceBench's speech prompt: the user turn is the audio alone."""
    return audio_prompt_template(processor, None)


def collate(rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded training batch from ``(prompt_ids, response_ids)`` pairs.

    Returns ``input_ids``, ``attention_mask`` and ``labels``, each ``(batch, longest)`` int64; labels are
    ``IGNORE_INDEX`` except on response tokens. Right padding keeps positions 0..n-1 for real tokens, as generation
    (which derives positions from the attention mask of a left-padded batch) sees them.
    """
    width = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        n_prompt, n = len(prompt), len(prompt) + len(response)
        input_ids[i, :n] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[i, :n] = 1
        labels[i, n_prompt:n] = torch.tensor(list(response), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


TEXT_TASKS: tuple[str, ...] = ("mcq", "short", "repeat")


def text_example(task: str, fact: Fact, rng: random.Random) -> TextExample:
    """An example of ``task`` (one of :data:`TEXT_TASKS`) about ``fact``: MCQ; short answer; or Repeat (of the MCQ
    prompt or the short question, so the LM can copy any question text it is shown)."""
    if task == "short":
        return short_example(fact)
    mcq = render_mcq(fact)
    if task == "mcq":
        return mcq_example(mcq)
    if task == "repeat":
        return repeat_example(mcq.prompt if rng.random() < 0.75 else fact.question())
    raise ValueError(f"unknown text task {task!r}; known: {TEXT_TASKS}")
