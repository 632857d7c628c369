"""The Voxtral family on a tiny offline checkpoint (tests/fixtures/tiny_voxtral.py, Mistral's own tokenizer through
mistral-common): detection, the request encoding's prompt layout, audio tokens per 30 s window, no system prompt with
audio, batching, teacher-forced logits, distillation's modules, the audio cache, and ``gap`` end to end against a
text LLM of another family (a proxy)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from speechlm_eval.backbone import backbone_identity
from speechlm_eval.models import voxtral
from speechlm_eval.models.base import ModelInputError, ModelLoadError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.models.family_contract import (
    GREEDY,
    assert_audio_cache_answers_alike,
    assert_batched_equals_single,
    assert_continuation_logits_contract,
    assert_distill_modules,
    assert_gap_run_is_complete,
    assert_prompt_cache_matches,
    assert_the_audio_reaches_the_model,
    clip,
    contract_prompts,
    run_gap,
)

pytest.importorskip("mistral_common")
CPU = LoadOptions(device="cpu")


@pytest.fixture(scope="module")
def voxtral_dir(tmp_path_factory):
    from tests.fixtures.tiny_voxtral import build_tiny_voxtral

    return build_tiny_voxtral(tmp_path_factory.mktemp("voxtral") / "speech_llm")


@pytest.fixture(scope="module")
def vox(voxtral_dir):
    torch.set_num_threads(1)
    return load_model(str(voxtral_dir), CPU)


def test_family_is_detected_and_loaded(voxtral_dir, vox):
    assert detect_family(str(voxtral_dir), CPU).name == "voxtral"
    assert type(vox.model).__name__ == "VoxtralForConditionalGeneration"
    assert type(vox.processor).__name__ == "VoxtralProcessor"
    assert type(vox.tokenizer).__name__ == "MistralCommonBackend"
    described = vox.describe()
    assert described["family"] == "voxtral" and described["max_audio_seconds"] == voxtral.MAX_AUDIO_SECONDS


def test_prompt_layout_is_mistral_commons(vox):
    assert vox.chat_text(Prompt(text="Who are you?")) == "<s>[INST]Who are you?[/INST]"
    assert vox.chat_text(Prompt(text="hi", system="Be brief.")) == (
        "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]hi[/INST]")
    assert vox.chat_text(Prompt(audio=clip(1), text="Which choice?")) == (
        "<s>[INST][BEGIN_AUDIO][AUDIO]Which choice?[/INST]")
    assert vox.default_system_prompt() is None
    # A text prompt's control tokens are control tokens, not the characters of "[INST]".
    ids = vox.encode([Prompt(text="hi")])["input_ids"][0].tolist()
    assert ids[:2] == [1, 3] and ids[-1] == 4


def test_audio_tokens_are_375_per_started_30_s_window(vox):
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(29.0, 1), text="Which?"), Prompt(audio=clip(31.0, 2))]
    inputs = vox.encode(prompts)
    counts = (inputs["input_ids"] == voxtral_audio_id(vox)).sum(-1).tolist()
    assert counts == [375, 375, 750] == [vox.audio_token_count(len(p.audio)) for p in prompts]
    assert inputs["input_features"].shape == (4, 128, 3000)  # one row per 30 s window: 1 + 1 + 2
    assert inputs["attention_mask"].sum(-1).tolist() == [vox.prompt_length(p) for p in prompts]
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padding


def voxtral_audio_id(vox) -> int:
    return int(vox.model.config.audio_token_id)


def test_a_system_prompt_with_audio_is_refused_with_the_reason(vox):
    with pytest.raises(ModelInputError, match="no system prompt"):
        vox.generate([Prompt(audio=clip(1.0), system="Be brief.")], GREEDY)
    assert vox.generate([Prompt(text="hi", system="Be brief.")], GREEDY)[0].n_new_tokens > 0


def test_batched_generation_equals_one_at_a_time(vox):
    assert_batched_equals_single(vox, [Prompt(text="Which animal is a mammal? " * n) for n in (1, 3, 6)])
    assert_batched_equals_single(vox, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(33.0, 2)),
                                       Prompt(audio=clip(0.5, 3), text="ok?")])


def test_the_audio_reaches_the_model(vox):
    assert_the_audio_reaches_the_model(vox)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logits_shapes_and_masks(vox, with_audio):
    assert_continuation_logits_contract(vox, contract_prompts(with_audio))


def test_distillation_finds_the_modules_and_lora_targets(vox):
    assert_distill_modules(vox, "VoxtralEncoder", "VoxtralMultiModalProjector", "LlamaModel")


def test_the_audio_cache_changes_no_answer(vox):
    assert_audio_cache_answers_alike(vox, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2)),
                                           Prompt(audio=clip(1.0, 3), text="ok?")])


def test_without_mistral_common_loading_names_the_extra(voxtral_dir, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mistral_common" else find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"speechlm-eval\[voxtral\]"):
        load_model(str(voxtral_dir), CPU)


def test_a_text_llm_of_another_family_is_a_proxy(vox, tiny_pair):
    identity = backbone_identity(vox, load_model(str(tiny_pair[1]), CPU))
    assert identity["label"] == "proxy"


@pytest.mark.slow
def test_gap_three_arms_and_diagnostics(voxtral_dir, tiny_pair, tmp_path):
    results = assert_gap_run_is_complete(run_gap(voxtral_dir, tiny_pair[1], tmp_path / "run"), "voxtral")
    manifest = results["manifest"]
    assert manifest["text_llm_reference"]["label"] == "proxy"
    assert manifest["system_prompt"]["text"] is None


def test_kd_support_matches_mistral_byte_tokens_to_a_converted_tekken_teacher(vox, tmp_path):
    """mistral-common names every byte token that is not UTF-8 alone "\ufffd"; matched by bytes, the student and
    a teacher reading the same tekken.json through transformers agree id for id."""
    from transformers import AutoTokenizer

    from speechlm_eval.distill.vocab import kd_support, token_keys
    from tests.fixtures.tiny_voxtral import build_tiny_tekken_teacher

    teacher = AutoTokenizer.from_pretrained(str(build_tiny_tekken_teacher(tmp_path / "teacher")))
    keys = token_keys(vox.tokenizer)
    assert keys[24] == ("special", "[AUDIO]") and keys[1000 + 0xC8] == ("bytes", b"\xc8")
    assert token_keys(teacher) == keys
    support = kd_support(teacher, vox.tokenizer)
    assert support.is_prefix and support.size == len(teacher)
    ids = vox.tokenizer("Hello, world", add_special_tokens=False)["input_ids"]
    assert support.teacher_targets(ids, vox.tokenizer, teacher) == teacher("Hello, world",
                                                                           add_special_tokens=False)["input_ids"]


@pytest.mark.slow
def test_distill_runs_to_a_before_after_report_and_both_outputs_load(voxtral_dir, tmp_path):
    from speechlm_eval.models.registry import get_family
    from tests.fixtures.tiny_voxtral import build_tiny_tekken_teacher
    from tests.models.family_contract import assert_distill_runs_to_a_report

    assert "distill" in get_family("voxtral").capabilities
    teacher = build_tiny_tekken_teacher(tmp_path / "teacher")
    manifest = assert_distill_runs_to_a_report(voxtral_dir, teacher, tmp_path / "run", lora=True)
    assert manifest["kd_support"]["aligned"] == "id prefix"
    assert "user turn" in manifest["speech_prompt_system"]  # its tokenizer takes no system turn beside audio
    assert load_model(str(tmp_path / "run" / "checkpoint"), CPU).family == "voxtral"


def test_the_prompt_cache_is_reused_as_a_fresh_forward_would_answer(vox):
    assert_prompt_cache_matches(vox, [clip(0.5 + 0.5 * k, seed=k) for k in range(4)])
