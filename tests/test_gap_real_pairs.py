"""The real-pair contract, on tiny pairs shaped like released ones (tests/fixtures/real_pairs.py): different
vocabularies, different template system prompts, generation_config leftovers, another architecture as "text LLM"."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from speechlm_eval.backbone import backbone_identity, shared_vocabulary
from speechlm_eval.cli import app
from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.registry import LoadOptions, load_model
from tests.fixtures.real_pairs import LEFTOVER_GENERATION, SPEECH_SYSTEM, TEXT_SYSTEM, build_real_shaped_pair

CPU = LoadOptions(device="cpu")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return build_real_shaped_pair(tmp_path_factory.mktemp("real-shaped"))


@pytest.fixture(scope="module")
def models(pair):
    return {name: load_model(str(getattr(pair, name)), CPU)
            for name in ("speech_llm", "backbone", "proxy", "speech_llm_clean")}


def gap(pair_dir: Path, text_model: Path, out: Path, *extra: str):
    args = ["gap", "--model", str(pair_dir), "--text-model", str(text_model), "--suite", "bundled:openbookqa,bbh",
            "--max-new-tokens", "6", "--out", str(out), *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())


def test_vocabularies_are_aligned_by_token_string(models):
    shared = shared_vocabulary(models["speech_llm"].tokenizer, models["backbone"].tokenizer)
    assert not shared.identical and shared.speech_only == shared.text_only == 3
    speech_vocab = models["speech_llm"].tokenizer.get_vocab()
    audio_id = speech_vocab["<|AUDIO|>"]
    assert audio_id not in shared.speech_ids  # an audio token is never compared with the text LLM's id there
    assert {c["speech"] for c in shared.conflicting} == {"<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"}
    by_speech = dict(zip(shared.speech_ids, shared.text_ids))
    assert by_speech[speech_vocab["<|im_end|>"]] == models["backbone"].tokenizer.get_vocab()["<|im_end|>"]


def test_backbone_or_proxy(models):
    assert backbone_identity(models["speech_llm"], models["backbone"])["label"] == "backbone"
    proxy = backbone_identity(models["speech_llm"], models["proxy"])
    assert proxy["label"] == "proxy" and "hidden_size 64 vs 96" in proxy["reason"]


def test_template_defaults_differ_and_the_run_sends_one_system_prompt_to_both(models):
    assert models["speech_llm"].default_system_prompt() == SPEECH_SYSTEM
    assert models["backbone"].default_system_prompt() == TEXT_SYSTEM
    # What gap sends: the speech LLM's default, explicitly, to both models.
    for name in ("speech_llm", "backbone"):
        rendered = models[name].chat_text(Prompt(text="Why?", system=SPEECH_SYSTEM))
        assert SPEECH_SYSTEM in rendered and TEXT_SYSTEM not in rendered, name


def test_checkpoint_leftovers_do_not_change_greedy_decoding(models):
    prompts = [Prompt(text="Which of these animals is a mammal? A. shark B. whale"), Prompt(text="the sea the sea")]
    config = GenerationConfig(max_new_tokens=24)
    leftover, clean = models["speech_llm"].generate(prompts, config), models["speech_llm_clean"].generate(prompts, config)
    assert [g.text for g in leftover] == [g.text for g in clean]
    # The leftovers would have changed the answers had they applied (so the check above can fail).
    applied = models["speech_llm_clean"].generate(prompts, GenerationConfig(
        max_new_tokens=24, extra=tuple(LEFTOVER_GENERATION.items())))
    assert [g.text for g in applied] != [g.text for g in clean]


@pytest.mark.slow
def test_gap_on_a_real_shaped_pair(pair, tmp_path):
    results = gap(pair.speech_llm, pair.backbone, tmp_path / "backbone")
    manifest = results["manifest"]
    assert manifest["text_llm_reference"]["label"] == "backbone"
    assert manifest["system_prompt"]["text"] == SPEECH_SYSTEM
    for arm, settings in manifest["generation_effective"].items():
        assert settings["do_sample"] is False and "repetition_penalty" not in settings, arm
        assert settings["max_new_tokens"] == 6
    distribution = results["diagnostics"]["distribution"]["openbookqa"]
    kl = distribution["kl_text_llm_vs_speech_llm"]
    assert kl is not None and math.isfinite(kl["value"]) and kl["value"] >= 0
    assert distribution["text_llm_support"] == "shared vocabulary, renormalised"

    proxied = gap(pair.speech_llm, pair.proxy, tmp_path / "proxy")
    assert proxied["manifest"]["text_llm_reference"]["label"] == "proxy"
    report = (tmp_path / "proxy" / "report.md").read_text()
    assert "forgetting vs proxy" in report and "is a proxy, not this speech LLM's backbone" in report
    assert "forgetting vs proxy" in (tmp_path / "proxy" / "report.html").read_text()


@pytest.mark.slow
def test_gen_kwargs_and_the_voicebench_preset_reach_decoding(pair, tmp_path):
    results = gap(pair.speech_llm_clean, pair.backbone, tmp_path / "kwargs", "--gen-kwargs",
                  "repetition_penalty=1.5,no_repeat_ngram_size=2", "--arm", "speech_llm_text", "--no-diagnostics")
    settings = results["manifest"]["generation_effective"]["speech_llm_text"]
    assert settings["repetition_penalty"] == 1.5 and settings["no_repeat_ngram_size"] == 2
    preset = gap(pair.speech_llm, pair.backbone, tmp_path / "preset", "--preset", "voicebench", "--arm",
                 "speech_llm_text", "--no-diagnostics")
    settings = preset["manifest"]["generation_effective"]["speech_llm_text"]
    assert settings["max_length"] == 2048 and settings["checkpoint_defaults"] is True
    assert settings["checkpoint_generation_config"]["repetition_penalty"] == 1.5
