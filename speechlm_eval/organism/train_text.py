"""Stage 0: the organism's text LLM, a tiny ``Qwen2ForCausalLM`` that memorises every fact of the world.

Trained on all facts as multiple choice and as short answers, and on "Repeat: <question>" (without it a frozen LM
cannot be taught to emit transcripts in stage A). Training stops once the evaluation MCQs are
answered correctly through the project's own text adapter (``CausalLMModel``: real chat template, greedy decoding).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

from speechlm_eval.data.item import Item
from speechlm_eval.models.hf_causal import CausalLMModel
from speechlm_eval.organism.corpus import TEXT_TASKS, collate, encode_text_example, text_example
from speechlm_eval.organism.evaluate import typed_scores
from speechlm_eval.organism.loop import Schedule, StageLog, train
from speechlm_eval.data.organism_world import World


@dataclass(frozen=True)
class TextLLMSpec:
    """Architecture and training of the text LLM (defaults: 0.75 M parameters, ~3 MB in fp32)."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    ffn_size: int = 512
    batch_size: int = 32
    schedule: Schedule = Schedule(steps=2000, lr=1e-3, warmup=50, check_every=200)
    # (until step, share of rows per task of corpus.TEXT_TASKS = MCQ, short answer, Repeat): a curriculum if needed.
    phases: tuple[tuple[int, tuple[float, ...]], ...] = ((1_000_000, (0.5, 0.2, 0.3)),)
    target_accuracy: float = 1.0  # stop at a check once typed eval accuracy reaches this


def text_config(tokenizer: Any, spec: TextLLMSpec):
    """The Qwen2 config: untied head (the speech model never ties it), eos = ``<|im_end|>``."""
    from transformers import Qwen2Config

    from speechlm_eval.organism.tokenizer import text_config_kwargs

    return Qwen2Config(**text_config_kwargs(spec, tokenizer, max_position_embeddings=1024))


def new_text_llm(tokenizer: Any, spec: TextLLMSpec, seed: int):
    """A freshly initialised text LLM with greedy, ``<|im_end|>``-terminated generation defaults."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(text_config(tokenizer, spec))
    set_generation_defaults(model, tokenizer)
    return model


def set_generation_defaults(model: torch.nn.Module, tokenizer: Any) -> None:
    model.generation_config.do_sample = False
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = tokenizer.pad_token_id


def text_batches(world: World, tokenizer: Any, spec: TextLLMSpec, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
    """``step -> batch``: each row's task drawn by the step's phase mix, then an example of it about a random fact;
    deterministic in seed."""
    rng = random.Random(seed)
    facts = list(world.facts)

    def next_batch(step: int) -> dict[str, torch.Tensor]:
        mix = next(m for until, m in spec.phases if step < until)
        tasks = rng.choices(TEXT_TASKS, weights=mix, k=spec.batch_size)
        rows = [encode_text_example(tokenizer, text_example(task, rng.choice(facts), rng)) for task in tasks]
        return collate(rows, tokenizer.pad_token_id)

    return next_batch


def train_text_llm(
    world: World,
    tokenizer: Any,
    eval_items: list[Item],
    spec: TextLLMSpec = TextLLMSpec(),
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[torch.nn.Module, StageLog]:
    """Train the text LLM on every fact until the eval MCQs are answered (``spec.target_accuracy``) or steps run out.

    ``tokenizer`` must carry the chat template. Returns the model (eval mode) and the stage log, whose checks hold
    the typed eval accuracy.
    """
    model = new_text_llm(tokenizer, spec, seed)
    adapter = CausalLMModel("organism-text-llm", model, tokenizer)

    def check(step: int) -> dict[str, float]:
        scores, _ = typed_scores(adapter, eval_items, max_new_tokens=6)
        accuracy = float(scores.mean())
        return {"typed_accuracy": accuracy, "stop": float(accuracy >= spec.target_accuracy)}

    log = train("text_llm", model, model.parameters(), text_batches(world, tokenizer, spec, seed + 1), spec.schedule,
                check=check, on_step=on_step)
    return model, log
