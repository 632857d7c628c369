"""Checks every audio-text family's tests run on its tiny checkpoint: batching, teacher-forced logits, the modules
distillation reaches, LoRA targets, and ``gap`` end to end. Each takes a loaded adapter (or checkpoint paths)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from speechlm_eval.models.base import GenerationConfig, Prompt

GREEDY = GenerationConfig(max_new_tokens=8)


def clip(seconds: float, seed: int = 0, scale: float = 0.1) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * scale).astype(np.float32)


def assert_batched_equals_single(model, prompts: list[Prompt], config: GenerationConfig = GREEDY) -> None:
    """Greedy answers of one left-padded batch == answers one prompt at a time (texts and token counts)."""
    single = [model.generate([p], config)[0] for p in prompts]
    batched = model.generate(prompts, config)
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_new_tokens for g in batched] == [g.n_new_tokens for g in single]
    assert [g.n_prompt_tokens for g in batched] == [g.n_prompt_tokens for g in single]
    assert all(g.n_new_tokens > 0 for g in batched)


def assert_continuation_logits_contract(model, prompts: list[Prompt]) -> None:
    """Shapes, right alignment and masks of ``continuation_logits``; gradients reach the LM head; log-probs agree."""
    continuations = ["B. whale and more", "ok"]
    logits, targets, mask = model.continuation_logits(prompts, continuations)
    n_long, n_short = (len(model.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in continuations)
    assert logits.shape[:2] == targets.shape == mask.shape == (2, n_long)
    assert logits.shape[2] == model.lm_head().weight.shape[0]
    assert mask[0].all() and int(mask[1].sum()) == n_short and mask[1, -n_short:].all()
    expected_targets = model.tokenizer(continuations[1], add_special_tokens=False)["input_ids"]
    assert targets[1, -n_short:].tolist() == expected_targets
    logits[mask].float().logsumexp(-1).sum().backward()
    assert model.lm_head().weight.grad is not None
    model.model.zero_grad(set_to_none=True)
    # The differentiable logits and the log-prob path agree.
    logprobs = model.continuation_logprobs(prompts, continuations)
    picked = torch.log_softmax(logits.detach().float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    for i, got in enumerate(logprobs):
        np.testing.assert_allclose(got, picked[i][mask[i]].numpy(), atol=1e-4)


def assert_the_audio_reaches_the_model(model) -> None:
    """A quiet and a loud clip give different log-probs of the same continuation: the audio is not dropped."""
    quiet, loud = Prompt(audio=clip(1.0, 5, scale=0.01)), Prompt(audio=clip(1.0, 6, scale=0.5))
    a, b = model.continuation_logprobs([quiet, loud], ["hello there", "hello there"])
    assert abs(a - b).max() > 1e-3


def contract_prompts(with_audio: bool) -> list[Prompt]:
    """Two short prompts for :func:`assert_continuation_logits_contract`, each with a 1 s clip when ``with_audio``."""
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea")]
    return [Prompt(audio=clip(1.0, 7), text=p.text) for p in prompts] if with_audio else prompts


def assert_distill_modules(model, encoder_class: str, projector_class: str | None, lm_class: str, *,
                           lm_only: bool = True) -> None:
    """``language_model()``/``audio_encoder()``/``projector()`` are the family's modules, and LoRA with the family's
    ``lora_targets`` adapts some of the language model's modules (with ``lm_only``, nothing outside it)."""
    from peft import LoraConfig, get_peft_model

    assert type(model.language_model()).__name__ == lm_class
    assert type(model.audio_encoder()).__name__ == encoder_class
    projector = model.projector()
    assert (type(projector).__name__ if projector is not None else None) == projector_class
    assert model.language_model() is not model.model and model.audio_encoder() is not model.model
    peft_model = get_peft_model(model.model, LoraConfig(r=2, lora_alpha=4, target_modules=model.lora_target_modules()))
    try:
        adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
        assert adapted, f"{model.lora_targets!r} matched no module"
        lm_modules = {id(m) for m in model.language_model().modules()}
        inside = [id(peft_model.get_submodule(name)) in lm_modules for name in adapted]
        assert any(inside)
        if lm_only:
            assert all(inside), [name for name, ok in zip(adapted, inside) if not ok]
        assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    finally:
        peft_model.unload()  # leave the fixture's model as it was


def run_gap(speech_dir: Path, text_dir: Path, out: Path) -> Path:
    """``speechlm-eval gap --model SPEECH --text-model TEXT --suite bundled --max-new-tokens 8`` through the CLI."""
    from typer.testing import CliRunner

    from speechlm_eval.cli import app

    args = ["gap", "--model", str(speech_dir), "--text-model", str(text_dir), "--suite", "bundled",
            "--max-new-tokens", "8", "--out", str(out)]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def assert_gap_run_is_complete(out: Path, family: str) -> dict:
    """Three arms, a record per item, no error record, diagnostics and perception records; returns results.json."""
    from speechlm_eval.rundir import ARMS

    items = read_lines(out / "items.jsonl")
    for arm in ARMS:
        records = read_lines(out / "records" / f"{arm}.jsonl")
        expected = items if arm == "speech_llm_speech" else [i for i in items if i["audio_instruction"] is None]
        assert [r["id"] for r in records] == [i["id"] for i in expected], arm
        errors = [(r["id"], r["error"]) for r in records if r["error"] is not None]
        assert not errors, (arm, errors)
        assert all(isinstance(r["response"], str) for r in records)
    diagnostics = read_lines(out / "records" / "diagnostics.jsonl")
    perception = read_lines(out / "records" / "perception.jsonl")
    assert diagnostics and perception
    for name, records in (("diagnostics", diagnostics), ("perception", perception)):
        errors = [(r["id"], r["error"]) for r in records if r.get("error") is not None]
        assert not errors, (name, errors)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["speech_llm"]["family"] == family
    assert manifest["models"]["text_llm"]["family"] == "hf-causal"
    return json.loads((out / "results.json").read_text())


def assert_audio_cache_answers_alike(model, prompts: list[Prompt]) -> None:
    """``gap``'s per-clip audio cache (log-mel features and encoder outputs) changes no answer: the prompts answered
    without it, then twice with it (the second time from the cache where the family's calls are row-wise; a family
    whose encoder packs clips into one sequence runs uncached, by itself)."""
    from speechlm_eval.models.encoder_cache import cached_audio_encoder

    with torch.no_grad():
        plain = model.generate(prompts, GREEDY)
        with cached_audio_encoder(model, 2**30) as cache:
            first = model.generate(prompts, GREEDY)
            again = model.generate(prompts, GREEDY)
    assert cache is not None
    assert [g.text for g in first] == [g.text for g in again] == [g.text for g in plain]
    assert [g.n_prompt_tokens for g in again] == [g.n_prompt_tokens for g in plain]
    assert cache.stats.hits + cache.stats.uncached_calls > 0
    assert "forward" not in vars(model.audio_encoder())


def assert_prompt_cache_matches(model, clips: list[np.ndarray]) -> None:
    """For a family that reuses its prompt cache (``gap``'s diagnostics on the speech arm's prompts): the kept cache
    gives the teacher-forced logits of a fresh forward (to 1e-4) and, for another instruction about the same clips,
    the answers of one-at-a-time generate."""
    assert model.reuses_prompt_cache
    prompts = [Prompt(audio=a) for a in clips]
    answers, state = model.generate_keeping_prompt(prompts, GREEDY)
    assert answers == model.generate(prompts, GREEDY)
    continuations = [[11 + k] * (1 + k % 3) for k in range(len(clips))]
    with torch.no_grad():
        fresh, _, fresh_mask = model.continuation_logits(prompts, continuations)
    logits, _, mask = state.continuation_logits(continuations)
    assert torch.equal(mask, fresh_mask) and torch.allclose(logits[mask], fresh[fresh_mask], atol=1e-4, rtol=0)
    rows = list(range(0, len(clips), 2)) + [len(clips) - 1] if len(clips) > 2 else list(range(len(clips)))
    rows = sorted(set(rows))  # a subset of the rows, as the diagnostics ask when some items are done already
    asked = [Prompt(audio=clips[k], text="Transcribe the speech in the audio exactly.") for k in rows]
    assert state.select(rows).generate(asked, GREEDY) == [model.generate([p], GREEDY)[0] for p in asked]
