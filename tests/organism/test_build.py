"""A micro organism build: real training code on a 4 x 4 world for a few steps, producing loadable checkpoints."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.registry import load_model
from speechlm_eval.organism import build, is_built, micro_spec
from speechlm_eval.organism.builder import make_processor
from speechlm_eval.organism.clips import HELD_OUT_VOICE, synthesize
from speechlm_eval.organism.train_text import train_text_llm
from speechlm_eval.data.organism_world import eval_items, make_world

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")


@pytest.fixture(scope="module")
def micro_build(tmp_path_factory):
    return build(tmp_path_factory.mktemp("organism"), seed=0, spec=micro_spec(), progress=False)


def test_micro_build_writes_loadable_checkpoints(micro_build) -> None:
    paths = micro_build
    assert is_built(paths.root)
    text_llm, speech_llm = load_model(str(paths.text_llm)), load_model(str(paths.speech_llm))
    assert text_llm.describe()["family"] == "hf-causal" and speech_llm.describe()["family"] == "qwen2-audio"
    rows = [json.loads(line) for line in paths.eval_suite.read_text().splitlines()]
    assert len(rows) == 8 and all(r["reference"] in "ABCD" for r in rows)
    config = GenerationConfig(max_new_tokens=3)
    clip = synthesize([rows[0]["prompt"]], [HELD_OUT_VOICE])[0]
    for model, prompt in ((text_llm, Prompt(text=rows[0]["prompt"])), (speech_llm, Prompt(text=rows[0]["prompt"])),
                          (speech_llm, Prompt(audio=clip))):
        assert model.generate([prompt], config)[0].n_new_tokens >= 1
    summary = json.loads(paths.summary.read_text())
    assert set(summary["timings_s"]) >= {"world", "text_llm", "clips", "stage_a", "stage_b", "total"}
    assert summary["sizes"]["speech_llm_bytes"] > summary["sizes"]["text_llm_bytes"] > 0
    distill = [json.loads(line) for line in paths.distill.read_text().splitlines()]
    assert {(r["entity"], r["attribute"]) for r in distill}.isdisjoint((r["entity"], r["attribute"]) for r in rows)


def test_speech_stage_changed_the_copied_lm(micro_build) -> None:
    """The speech LLM's LM has the text LLM's architecture (hub key layout) and stage B moved its weights."""
    from safetensors.torch import load_file

    text = load_file(str(micro_build.text_llm / "model.safetensors"))
    speech = load_file(str(micro_build.speech_llm / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    speech_key = "language_model." + key
    assert text[key].shape == speech[speech_key].shape
    assert not torch.equal(text[key], speech[speech_key])


def test_text_training_is_deterministic() -> None:
    spec = micro_spec()
    world = make_world(0, spec.world)
    processor = make_processor(world, spec.vocab_size, 6, 0, 320)
    items = eval_items(world)
    torch.set_num_threads(1)
    first, _ = train_text_llm(world, processor.tokenizer, items, spec.text, seed=0)
    second, _ = train_text_llm(world, processor.tokenizer, items, spec.text, seed=0)
    other, _ = train_text_llm(world, processor.tokenizer, items, spec.text, seed=1)
    a, b, c = (np.concatenate([p.detach().ravel().numpy() for p in m.parameters()]) for m in (first, second, other))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rebuild_through_the_cli_is_byte_identical(micro_build, tmp_path) -> None:
    """`speechlm-eval organism build --micro` twice with one seed: the same weights, suite and distillation data."""
    from typer.testing import CliRunner

    from speechlm_eval.cli import app

    result = CliRunner().invoke(app, ["organism", "build", "--out", str(tmp_path / "again"), "--micro", "--quiet"])
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    for name in ("text_llm/model.safetensors", "speech_llm/model.safetensors", "text_llm/tokenizer.json",
                 "organism_mcq.jsonl", "distill.jsonl"):
        assert (again / name).read_bytes() == (micro_build.root / name).read_bytes(), name


def test_distillation_data_reads_as_open_orca_rows(micro_build) -> None:
    from speechlm_eval.distill.data import load_distill_data

    examples = load_distill_data(micro_build.distill)
    rows = [json.loads(line) for line in micro_build.eval_suite.read_text().splitlines()]
    assert len(examples) == 16 and all(e.response in "ABCD" for e in examples)
    assert {e.question for e in examples}.isdisjoint(r["prompt"] for r in rows)


def test_more_speech_training_control_moves_the_speech_llm_and_loads(micro_build, tmp_path) -> None:
    from safetensors.torch import load_file

    from speechlm_eval.experiments.controls import continue_speech_training

    out = continue_speech_training(micro_build.root, tmp_path / "more", steps=2, spec=micro_spec())
    assert load_model(str(out)).describe()["family"] == "qwen2-audio"
    before = load_file(str(micro_build.speech_llm / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    assert key in after and not torch.equal(before[key], after[key])
    assert json.loads((out / "continued_training.json").read_text())["steps"] == 2
