"""The Gemma 3n family on a tiny offline checkpoint (tests/fixtures/tiny_gemma3n.py): detection, the chat template's
layout (no system role, one <bos>), 188 audio soft tokens, batching, log-probs/logits, the 30 s window, the module
tree without the vision tower, LoRA targets, gap."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from speechlm_eval.models.base import GenerationConfig, ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.fixtures.tiny import bundled_corpus
from tests.fixtures.tiny_gemma3n import build_tiny_gemma3n_pair
from tests.fixtures.tiny_models import CORPUS
from tests.models.family_contract import (
    assert_audio_cache_answers_alike,
    assert_batched_equals_single,
    assert_continuation_logits_contract,
    assert_distill_modules,
    assert_distill_runs_to_a_report,
    assert_gap_run_is_complete,
    run_gap,
)
from tests.models.test_adapters import naive_logprobs

CPU = LoadOptions(device="cpu")
GREEDY = GenerationConfig(max_new_tokens=6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(text_dir, speech_dir); the tokenizer also covers the bundled suite, for the end-to-end run."""
    return build_tiny_gemma3n_pair([*CORPUS, *bundled_corpus()], tmp_path_factory.mktemp("gemma3n"))


@pytest.fixture(scope="module")
def gemma(pair):
    return load_model(str(pair[1]), CPU)


@pytest.fixture(scope="module")
def text_llm(pair):
    return load_model(str(pair[0]), CPU)


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def test_detected_and_loaded_without_the_vision_tower(pair, gemma):
    assert detect_family(str(pair[1]), CPU).name == "gemma3n"
    assert detect_family(str(pair[0]), CPU).name == "hf-causal"
    config = json.loads((pair[1] / "config.json").read_text())
    assert config["model_type"] == "gemma3n" and config["architectures"] == ["Gemma3nForConditionalGeneration"]
    assert json.loads((pair[0] / "config.json").read_text())["model_type"] == "gemma3n_text"
    assert type(gemma.processor).__name__ == "Gemma3nProcessor"
    described = gemma.describe()
    assert described["family"] == "gemma3n" and described["max_audio_seconds"] == 30.0
    assert described["vision_tower"] == "omitted" and described["audio_tokens_per_clip"] == 188
    with pytest.raises(ModelInputError, match="vision tower"):
        gemma.model.model.vision_tower(torch.zeros(1, 3, 8, 8))


def test_a_checkpoint_with_vision_weights_loads_them_not(pair, gemma, tmp_path):
    """Hub checkpoints carry the timm tower's weights: they are skipped, everything else loads exactly."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "with_vision"
    shutil.copytree(pair[1], copy)
    weights = load_file(str(copy / "model.safetensors"))
    save_file({**weights, "model.vision_tower.timm_model.conv_stem.conv.weight": torch.zeros(4, 3, 3, 3)},
              str(copy / "model.safetensors"), metadata={"format": "pt"})
    again = load_model(str(copy), CPU)
    for name, tensor in again.model.state_dict().items():
        torch.testing.assert_close(tensor, gemma.model.state_dict()[name], rtol=0, atol=0)


def test_prompt_layout_folds_the_system_turn_and_has_one_bos(gemma, text_llm):
    assert gemma.chat_text(Prompt(audio=clip(1), text="Transcribe this audio")) == (
        "<bos><start_of_turn>user\n<audio_soft_token>Transcribe this audio<end_of_turn>\n<start_of_turn>model\n")
    assert gemma.chat_text(Prompt(text="Who are you?", system="Be brief.")) == (
        "<bos><start_of_turn>user\nBe brief.\n\nWho are you?<end_of_turn>\n<start_of_turn>model\n")
    assert gemma.default_system_prompt() is None  # no system role: gap sends none unless asked
    for prompt in (Prompt(text="Who are you?"), Prompt(text="Who are you?", system="Be brief.")):
        assert gemma.chat_text(prompt) == text_llm.chat_text(prompt)
    bos = gemma.tokenizer.bos_token_id
    for prompt in (Prompt(text="hi"), Prompt(audio=clip(1.0), text="hi")):
        ids = gemma.encode([prompt])["input_ids"][0]
        assert ids[0] == bos and int((ids == bos).sum()) == 1


def test_every_clip_becomes_188_soft_tokens_and_the_encoder_count_is_exact(gemma):
    audio_id = gemma.tokenizer.convert_tokens_to_ids("<audio_soft_token>")
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(2.5, 1), text="Which choice?")]
    for prompt in prompts:
        inputs = gemma.encode([prompt])
        assert int((inputs["input_ids"] == audio_id).sum()) == 188
        assert int(inputs["attention_mask"].sum()) == gemma.prompt_length(prompt)
        with torch.no_grad():
            out = gemma.model.model.get_audio_features(inputs["input_features"], ~inputs["input_features_mask"])
        # 6.25 encoder tokens per second: 1 s -> 7, 2.5 s -> 16 (the rest of the 188 are padding embeddings).
        assert int((~out.audio_mel_mask).sum()) == gemma.audio_token_count(len(prompt.audio))
    assert [gemma.audio_token_count(16000), gemma.audio_token_count(40000), gemma.audio_token_count(480000)] == [7, 16,
                                                                                                               188]


def test_batched_generation_equals_one_at_a_time(gemma):
    assert_batched_equals_single(gemma, [Prompt(text="Which animal is a mammal? " * n) for n in (1, 4)]
                                 + [Prompt(text="the sea")], GREEDY)
    # Clips of different lengths run in sub-batches (the front end sees past a clip's end); equal ones share one.
    assert_batched_equals_single(gemma, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2), text="ok?"),
                                         Prompt(audio=clip(1.0, 3))], GREEDY)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logprobs_match_a_naive_forward(gemma, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea " * 5)]
    if with_audio:
        prompts = [Prompt(audio=clip(s, 3), text=p.text) for p, s in zip(prompts, (1.0, 2.2))]
    continuations = ["B. whale", "a short poem about the sea"]
    for prompt, continuation, got in zip(prompts, continuations, gemma.continuation_logprobs(prompts, continuations)):
        expected = naive_logprobs(gemma, prompt, continuation)
        assert got.shape == expected.shape and got.shape[0] > 1
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logits_contract(gemma, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea")]
    if with_audio:  # two lengths: two sub-batches, re-assembled right-aligned
        prompts = [Prompt(audio=clip(s, 4), text=p.text) for p, s in zip(prompts, (1.0, 1.7))]
    assert_continuation_logits_contract(gemma, prompts)


def test_gradients_reach_the_audio_tower_and_embedder(gemma):
    logits, _, mask = gemma.continuation_logits([Prompt(audio=clip(1.0, 8))], ["B. whale"])
    logits[mask].float().logsumexp(-1).sum().backward()
    assert gemma.audio_encoder().subsample_conv_projection.input_proj_linear.weight.grad is not None
    assert gemma.projector().embedding_projection.weight.grad is not None
    gemma.model.zero_grad(set_to_none=True)


def test_clips_over_the_30s_window_or_too_short_are_refused(gemma):
    with pytest.raises(ModelInputError, match="encoder window"):
        gemma.generate([Prompt(audio=clip(30.5))], GREEDY)
    with pytest.raises(ModelInputError, match="too short"):
        gemma.generate([Prompt(audio=clip(0.03))], GREEDY)  # 480 samples: no 32 ms frame
    assert gemma.generate([Prompt(audio=clip(0.04))], GREEDY)[0].n_new_tokens > 0  # one frame, one encoder token


def test_language_model_encoder_projector_and_lora_targets(gemma):
    assert_distill_modules(gemma, "Gemma3nAudioEncoder", "Gemma3nMultimodalEmbedder", "Gemma3nTextModel")
    assert gemma.projector() is gemma.model.model.embed_audio
    names = gemma.lora_target_modules()
    assert all(".language_model.layers." in name for name in names)
    # q/k/v/o in the two layers that compute their KV, q/o in the two that reuse it (KV sharing, as E4B's last 15).
    assert len(names) == 2 * 4 + 2 * 2


def test_saved_checkpoint_round_trips(gemma, tmp_path):
    """Saved after use, as distillation saves a student: the tokenizer then carries the padding of its last call
    into its files, which must not reach the feature extractor of the reloaded processor."""
    prompt = Prompt(audio=clip(1.2, 9), text="Which choice?")
    expected = gemma.generate([prompt, Prompt(audio=clip(1.2, 10))], GREEDY)[0].text
    gemma.model.save_pretrained(tmp_path)
    gemma.processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Gemma3nForConditionalGeneration"]
    again = load_model(str(tmp_path), CPU)
    assert again.family == "gemma3n" and again.max_audio_seconds == gemma.max_audio_seconds
    assert again.generate([prompt], GREEDY)[0].text == expected
    torch.testing.assert_close(again.encode([prompt])["input_features"], gemma.encode([prompt])["input_features"])
    # And through gap's audio cache, whose proxy stands in for the feature extractor (its own call has no defaults).
    assert_audio_cache_answers_alike(again, [prompt, Prompt(audio=clip(2.0, 11))])


def test_the_tiny_text_llm_is_its_backbone_and_the_family_names_none(gemma, text_llm):
    from speechlm_eval.backbone import backbone_identity
    from speechlm_eval.models.registry import get_family

    assert backbone_identity(gemma, text_llm)["label"] == "backbone"
    assert get_family("gemma3n").backbone is None  # no public text-only Gemma 3n


@pytest.mark.slow
def test_gap_end_to_end(pair, tmp_path):
    text_dir, speech_dir = pair
    results = assert_gap_run_is_complete(run_gap(speech_dir, text_dir, tmp_path / "run"), "gemma3n")
    assert results["manifest"]["system_prompt"]["text"] is None  # no system role, no template default
    assert results["manifest"]["text_llm_reference"]["label"] == "backbone"  # the tiny pair only; none public


def test_the_audio_cache_changes_no_answer(gemma):
    from tests.models.family_contract import clip as contract_clip

    assert_audio_cache_answers_alike(gemma, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])


@pytest.mark.slow
def test_distill_with_lora_runs_to_a_before_after_report(pair, tmp_path):
    text_dir, speech_dir = pair
    manifest = assert_distill_runs_to_a_report(speech_dir, text_dir, tmp_path / "run", lora=True)
    assert manifest["student"]["family"] == "gemma3n"
