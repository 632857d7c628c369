"""The Granite Speech family on a tiny offline checkpoint (tests/fixtures/tiny_granite_speech.py): detection, the
model card's prompt layout, the audio-only adapter, batching, log-probs/logits, the module tree, LoRA targets, gap."""

from __future__ import annotations

import datetime
import json

import numpy as np
import pytest
import torch

from speechlm_eval.models import granite_speech
from speechlm_eval.models.speech_adapter import SPEECH_ADAPTER, set_speech_adapter
from speechlm_eval.models.base import GenerationConfig, ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.fixtures.tiny import bundled_corpus
from tests.fixtures.tiny_granite_speech import build_tiny_granite_pair
from tests.fixtures.tiny_models import CORPUS
from tests.models.family_contract import (
    assert_batched_equals_single,
    assert_continuation_logits_contract,
    assert_distill_modules,
    assert_distill_runs_to_a_report,
    assert_distilled_keeps_its_speech_adapter,
    assert_gap_run_is_complete,
    run_gap,
)
from tests.models.test_adapters import naive_logprobs

CPU = LoadOptions(device="cpu")
GREEDY = GenerationConfig(max_new_tokens=6)
SYSTEM = ("<|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
          "You are Granite, developed by IBM. You are a helpful AI assistant<|end_of_text|>\n")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(text_dir, speech_dir); the tokenizer also covers the bundled suite, for the end-to-end run."""
    return build_tiny_granite_pair([*CORPUS, *bundled_corpus()], tmp_path_factory.mktemp("granite"))


@pytest.fixture(scope="module")
def granite(pair):
    return load_model(str(pair[1]), CPU)


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


def test_detected_and_loaded_with_its_adapter(pair, granite):
    assert detect_family(str(pair[1]), CPU).name == "granite-speech"
    assert detect_family(str(pair[0]), CPU).name == "hf-causal"
    assert json.loads((pair[1] / "config.json").read_text())["model_type"] == "granite_speech"
    assert (pair[1] / "adapter_config.json").exists()  # beside the weights, as on the hub
    described = granite.describe()
    assert described["family"] == "granite-speech" and described["speech_adapter"] is True
    assert described["max_audio_seconds"] is None  # no fixed encoder window
    assert type(granite.processor).__name__ == "GraniteSpeechProcessor"
    assert type(granite.model).__name__ == "GraniteSpeechForConditionalGeneration"


def test_prompt_layout_is_the_model_cards(granite):
    assert granite.chat_text(Prompt(audio=clip(1), text="can you transcribe the speech into a written format?")) == (
        SYSTEM + "<|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech into a written format?"
        "<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
    assert granite.chat_text(Prompt(audio=clip(1))) == (
        SYSTEM + "<|start_of_role|>user<|end_of_role|><|audio|><|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")
    assert granite.chat_text(Prompt(text="Who are you?", system="Be brief.")) == (
        "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>"
        "Who are you?<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>")


def test_the_fixed_system_prompt_is_sent_because_the_template_default_carries_todays_date(granite):
    assert granite.default_system_prompt() == granite_speech.SYSTEM_PROMPT
    template_default = granite.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert datetime.date.today().strftime("%B %d, %Y") in template_default


def test_audio_placeholder_expands_to_the_projector_output(granite):
    audio_id = granite.tokenizer.convert_tokens_to_ids("<|audio|>")
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(2.5, 1), text="Which choice?")]
    # 1 s: 101 mel frames -> 50 stacked pairs -> 4 windows of 15 -> 3 queries each = 12; 2.5 s: 126 -> 9 windows = 27.
    assert [granite.audio_token_count(len(p.audio)) for p in prompts] == [12, 27]
    for prompt, expected in zip(prompts, (12, 27)):
        inputs = granite.encode([prompt])
        assert int((inputs["input_ids"] == audio_id).sum()) == expected
        assert inputs["input_features"].shape[-1] == 160  # two 80-bin log-mel frames stacked
        assert int(inputs["attention_mask"].sum()) == granite.prompt_length(prompt)


def test_the_speech_adapter_is_on_for_audio_only(granite):
    granite.encode([Prompt(audio=clip(1.0))])
    assert all(layer.active_adapters == [SPEECH_ADAPTER] for layer in lora_layers(granite.model))
    granite.encode([Prompt(text="hi")])
    assert all(layer.active_adapters == [] for layer in lora_layers(granite.model))
    assert len(lora_layers(granite.model)) == 4  # q_proj and v_proj of two LLM layers
    text = Prompt(text="Which animal is a mammal?")
    before = granite.continuation_logprobs([text], ["B. whale"])[0]
    with_audio = granite.continuation_logprobs([Prompt(audio=clip(1.0, 2))], ["B. whale"])[0]
    assert np.array_equal(granite.continuation_logprobs([text], ["B. whale"])[0], before)  # no state leaks
    # The adapter changes what the audio prompt gets (so the switch above is not vacuous).
    inputs = granite.encode([Prompt(audio=clip(1.0, 2))])
    set_speech_adapter(granite.model, False)
    without = naive_logprobs_from(granite, inputs, "B. whale")
    assert np.abs(with_audio - without).max() > 1e-4


def naive_logprobs_from(model, inputs, continuation):
    cont = model.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([inputs["input_ids"], torch.tensor([cont])], dim=1)
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model.model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return np.array([logprobs[p - 1, ids[0, p]].item() for p in range(ids.shape[1] - len(cont), ids.shape[1])])


def test_batched_generation_equals_one_at_a_time(granite):
    assert_batched_equals_single(granite, [Prompt(text="Which animal is a mammal? " * n) for n in (1, 4)]
                                 + [Prompt(text="the sea")], GREEDY)
    # Clips of different lengths run in sub-batches (the encoder has no padding mask); equal ones share one.
    assert_batched_equals_single(granite, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2), text="ok?"),
                                           Prompt(audio=clip(1.0, 3))], GREEDY)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logprobs_match_a_naive_forward(granite, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea " * 5)]
    if with_audio:
        prompts = [Prompt(audio=clip(s, 3), text=p.text) for p, s in zip(prompts, (1.0, 2.2))]
    continuations = ["B. whale", "a short poem about the sea"]
    for prompt, continuation, got in zip(prompts, continuations,
                                         granite.continuation_logprobs(prompts, continuations)):
        expected = naive_logprobs(granite, prompt, continuation)
        assert got.shape == expected.shape and got.shape[0] > 1
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logits_contract(granite, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea")]
    if with_audio:  # two lengths: two sub-batches, re-assembled right-aligned
        prompts = [Prompt(audio=clip(s, 4), text=p.text) for p, s in zip(prompts, (1.0, 1.7))]
    assert_continuation_logits_contract(granite, prompts)


def test_length_grouped_logits_equal_each_clip_alone_and_reach_the_encoder(granite):
    prompts = [Prompt(audio=clip(1.0, 4)), Prompt(audio=clip(1.7, 5), text="ok?")]
    continuations = ["B. whale and more", "yes"]
    logits, targets, mask = granite.continuation_logits(prompts, continuations)
    for row, (prompt, continuation) in enumerate(zip(prompts, continuations)):
        alone, alone_targets, _ = granite.continuation_logits([prompt], [continuation])
        torch.testing.assert_close(logits[row, mask[row]], alone[0], atol=1e-5, rtol=0)
        assert torch.equal(targets[row, mask[row]], alone_targets[0])
    logits[mask].float().logsumexp(-1).sum().backward()
    assert granite.audio_encoder().input_linear.weight.grad is not None
    assert granite.projector().linear.weight.grad is not None
    granite.model.zero_grad(set_to_none=True)


def test_clips_are_refused_only_when_too_short(granite):
    # No fixed window: the encoder attends in 4 s blocks over any length, and nothing truncates a long clip.
    assert granite.max_audio_seconds is None
    granite.check_audio(clip(45.0))
    with pytest.raises(ModelInputError, match="too short"):
        granite.generate([Prompt(audio=clip(0.005))], GREEDY)  # 80 samples: one mel frame, no audio token


def test_language_model_encoder_projector_and_lora_targets(pair):
    model = load_model(str(pair[1]), CPU)  # a copy: LoRA is applied and unloaded (with the speech adapter)
    assert_distill_modules(model, "GraniteSpeechCTCEncoder", "GraniteSpeechEncoderProjector", "GraniteModel")
    assert model.lm_head() is model.model.lm_head
    # q/k/v/o of the two LLM layers; none in the encoder (to_q/to_kv) or the Q-Former (query/key/value).
    assert len(model.lora_target_modules()) == 8
    assert all(".language_model.layers." in name for name in model.lora_target_modules())


def test_distillation_keeps_the_audio_only_adapter_separate(pair, tmp_path):
    from speechlm_eval.models.registry import get_family

    assert "distill" in get_family("granite-speech").capabilities
    assert_distilled_keeps_its_speech_adapter(pair[1], pair[0], tmp_path / "run", granite_speech.GraniteSpeechModel.speech_adapter_folder)


def test_the_fsdp_save_path_writes_what_the_plain_one_does(pair, tmp_path):
    """The save from a gathered full state dict (FSDP's path: the merge is rebuilt from the saved adapter on a fresh
    student) writes the same weights and the same speech adapter as the plain save, with LoRA and without."""
    from safetensors.torch import load_file

    from speechlm_eval.distill.checkpointing import gathered_student_state, save_student
    from speechlm_eval.distill.config import DistillConfig, resolve_distill_config
    from speechlm_eval.distill.train import make_trainable

    folder = granite_speech.GraniteSpeechModel.speech_adapter_folder
    for lora in (True, False):
        config = resolve_distill_config(DistillConfig(student=str(pair[1]), teacher=str(pair[0]), lora=lora,
                                                      out=tmp_path / f"cfg{lora}"))
        student = load_model(str(pair[1]), CPU)
        model = make_trainable(student, config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)
        gathered = save_student(model, student.processor, tmp_path / f"gathered{lora}", config,
                                state_dict=gathered_student_state(model, lora), speech_adapter_folder=folder)
        plain = save_student(model, student.processor, tmp_path / f"plain{lora}", config,
                             speech_adapter_folder=folder)
        for name in ("model.safetensors", "adapter_model.safetensors"):
            a, b = (load_file(str(d / name)) for d in (plain, gathered))
            assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name
        shipped = load_file(str(pair[1] / "adapter_model.safetensors"))
        assert all(torch.equal(load_file(str(gathered / "adapter_model.safetensors"))[k], v) for k, v in shipped.items())


def test_the_text_llm_is_labelled_its_backbone(pair, granite):
    from speechlm_eval.backbone import backbone_identity

    identity = backbone_identity(granite, load_model(str(pair[0]), CPU))
    assert identity["label"] == "backbone", identity["reason"]


def test_features_equal_torchaudios_where_it_exists(granite):
    try:
        from transformers import GraniteSpeechFeatureExtractor

        reference = GraniteSpeechFeatureExtractor()
    except Exception as error:  # ImportError / requires_backends without torchaudio
        pytest.skip(f"GraniteSpeechFeatureExtractor needs torchaudio: {error}")
    audios = [clip(1.3, 1), clip(0.7, 2)]
    got, expected = granite.processor.audio_processor(audios), reference(audios)
    torch.testing.assert_close(got["input_features"], expected["input_features"], atol=1e-5, rtol=1e-5)
    assert got["audio_embed_sizes"] == expected["audio_embed_sizes"]


@pytest.mark.slow
def test_gap_end_to_end(pair, tmp_path):
    text_dir, speech_dir = pair
    results = assert_gap_run_is_complete(run_gap(speech_dir, text_dir, tmp_path / "run"), "granite-speech")
    assert results["manifest"]["system_prompt"]["text"] == granite_speech.SYSTEM_PROMPT
    assert results["manifest"]["text_llm_reference"]["label"] == "backbone"


@pytest.mark.slow
def test_distill_with_lora_runs_to_a_before_after_report(pair, tmp_path):
    manifest = assert_distill_runs_to_a_report(pair[1], pair[0], tmp_path / "run", lora=True)
    assert manifest["student"]["speech_adapter"] is True
    assert load_model(str(tmp_path / "run" / "checkpoint"), CPU).describe()["speech_adapter"] is True


def test_the_audio_cache_changes_no_answer(granite):
    from tests.models.family_contract import assert_audio_cache_answers_alike, clip as contract_clip

    assert_audio_cache_answers_alike(granite, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])
