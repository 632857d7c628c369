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

    from speechlm_eval.models.speech_adapter import beside_speech_adapter

    assert type(model.language_model()).__name__ == lm_class
    assert type(model.audio_encoder()).__name__ == encoder_class
    projector = model.projector()
    assert (type(projector).__name__ if projector is not None else None) == projector_class
    assert model.language_model() is not model.model and model.audio_encoder() is not model.model
    with beside_speech_adapter():  # Granite Speech / Phi-4 already hold their own adapter
        peft_model = get_peft_model(model.model, LoraConfig(r=2, lora_alpha=4,
                                                            target_modules=model.lora_target_modules()))
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


def assert_distilled_keeps_its_speech_adapter(speech_dir: Path, text_dir: Path, out: Path, folder: str) -> None:
    """A student that ships an audio-only LoRA (``speech_dir/folder``) trains distillation's LoRA beside it and saves
    it apart: the speech adapter stays frozen and on for audio only while training; the merged checkpoint keeps it,
    unchanged, in ``folder``; the checkpoint and the adapter folder both reload to the trained model's logits, on
    text and on audio (a merge that baked the speech adapter into the weights, or dropped it, fails here)."""
    from safetensors.torch import load_file

    from speechlm_eval.distill.checkpointing import save_student
    from speechlm_eval.distill.config import DistillConfig, resolve_distill_config
    from speechlm_eval.distill.train import make_trainable
    from speechlm_eval.models.registry import LoadOptions, load_model
    from speechlm_eval.models.speech_adapter import SPEECH_ADAPTER, lora_layers_with

    cpu = LoadOptions(device="cpu")
    student = load_model(str(speech_dir), cpu)
    original = load_model(str(speech_dir), cpu)
    config = resolve_distill_config(DistillConfig(student=str(speech_dir), teacher=str(text_dir), out=out, lora=True,
                                                  lora_r=2, lora_alpha=4))
    model = make_trainable(student, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable), sorted(trainable)[:3]
    torch.manual_seed(0)
    for layer in lora_layers_with(model, "default"):  # peft starts lora_B at zero: make the adapter do something
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.5)
    shared = [layer for layer in lora_layers_with(model, "default") if SPEECH_ADAPTER in layer.lora_A]
    assert shared, "distillation's LoRA shares no layer with the speech adapter: the test shows nothing"
    student.model = model.eval()
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(audio=clip(1.0, 3), text="Answer.")]
    targets = ["B. whale", "the sea"]

    def logits(speech_lm, prompt: Prompt, target: str) -> torch.Tensor:
        with torch.no_grad():
            return speech_lm.continuation_logits([prompt], [target])[0].float()

    trained = [logits(student, p, t) for p, t in zip(prompts, targets)]
    assert set(shared[0].active_adapters) == {"default", SPEECH_ADAPTER}  # the last batch held audio
    logits(student, prompts[0], targets[0])
    assert list(shared[0].active_adapters) == ["default"]  # text: distillation's LoRA alone
    for before, after in zip((logits(original, p, t) for p, t in zip(prompts, targets)), trained):
        assert (before - after).abs().max() > 1e-3  # the trained LoRA changes both paths
    saved = save_student(model, student.processor, out, config, speech_adapter_folder=folder)
    assert saved == out / "checkpoint"
    written = load_file(str(saved / folder / "adapter_model.safetensors"))
    shipped = load_file(str(speech_dir / folder / "adapter_model.safetensors"))
    assert written.keys() == shipped.keys() and all(torch.equal(written[k], shipped[k]) for k in shipped)
    weights = load_file(str(saved / "model.safetensors"))
    assert not [k for k in weights if "lora_" in k or "base_layer" in k]
    assert not (out / "adapter" / "speech").exists()  # the adapter folder holds distillation's LoRA only
    for reloaded in (load_model(str(saved), cpu), load_model(str(out / "adapter"), cpu)):
        assert reloaded.describe()["speech_adapter"] is True
        for prompt, target, expected in zip(prompts, targets, trained):
            torch.testing.assert_close(logits(reloaded, prompt, target), expected, rtol=1e-4, atol=1e-4)


def assert_distill_runs_to_a_report(speech_dir: Path, text_dir: Path, out: Path, *, lora: bool) -> dict:
    """``distill`` then the before/after evaluation on a tiny pair: the report and comparison are written, every
    logged loss is finite, and what ``gap`` would score loads back (with LoRA: the merged checkpoint and the adapter
    folder answer alike, on audio and on text). Returns the run's manifest."""
    import math

    from speechlm_eval.distill.config import DistillConfig, EvalConfig
    from speechlm_eval.distill.pipeline import distill_and_compare
    from speechlm_eval.models.registry import LoadOptions, load_model

    report = distill_and_compare(
        DistillConfig(student=str(speech_dir), teacher=str(text_dir), out=out, max_examples=8, batch_size=4,
                      max_response_tokens=12, lr=1e-2, epochs=1, seed=0, lora=lora),
        EvalConfig(eval_limit=4, eval_max_new_tokens=4, eval_device="cpu"))
    assert "inequivalence" in report.read_text() and (out / "comparison.json").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(math.isfinite(r["loss_tt"]) and math.isfinite(r["loss_st"]) for r in log)
    cpu = LoadOptions(device="cpu")
    merged = load_model(str(out / "checkpoint"), cpu)
    prompts = [Prompt(audio=clip(1.0, 4)), Prompt(text="Which animal is a mammal?")]
    if lora:
        adapter = load_model(str(out / "adapter"), cpu)
        assert adapter.family == merged.family
        for prompt in prompts:  # one at a time: a batch is all-audio or all-text
            assert merged.generate([prompt], GREEDY)[0].text == adapter.generate([prompt], GREEDY)[0].text
    return manifest
