"""The Phi-4-multimodal family on a tiny offline checkpoint (tests/fixtures/tiny_phi4_multimodal.py): detection, the
prompt layout, the speech-lora adapter (audio only), batching, log-probs/logits, the audio path inside the embedding
layer, LoRA targets and distillation's freezing, gap."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from speechlm_eval.models.speech_adapter import SPEECH_ADAPTER
from speechlm_eval.models.base import GenerationConfig, ModelInputError, Prompt
from speechlm_eval.models.registry import LoadOptions, detect_family, load_model
from tests.fixtures.tiny import bundled_corpus
from tests.fixtures.tiny_models import CORPUS
from tests.fixtures.tiny_phi4_multimodal import build_tiny_phi4_pair
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


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(text_dir, speech_dir); the tokenizer also covers the bundled suite, for the end-to-end run."""
    return build_tiny_phi4_pair([*CORPUS, *bundled_corpus()], tmp_path_factory.mktemp("phi4"))


@pytest.fixture(scope="module")
def phi(pair):
    return load_model(str(pair[1]), CPU)


def clip(seconds: float, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def lora_layers(model):
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)]


def test_detected_and_loaded_with_its_speech_adapter(pair, phi):
    assert detect_family(str(pair[1]), CPU).name == "phi4-multimodal"
    assert detect_family(str(pair[0]), CPU).name == "hf-causal"
    assert json.loads((pair[1] / "config.json").read_text())["model_type"] == "phi4_multimodal"
    assert json.loads((pair[0] / "config.json").read_text())["model_type"] == "phi3"
    assert (pair[1] / "speech-lora" / "adapter_config.json").exists()
    described = phi.describe()
    assert described["family"] == "phi4-multimodal" and described["speech_adapter"] is True
    assert described["max_audio_seconds"] is None
    # q/k/v fused, o, gate/up fused, down: four adapted projections in each of the two decoder layers.
    assert len(lora_layers(phi.model)) == 8


def test_prompt_layout(phi):
    assert phi.chat_text(Prompt(audio=clip(1), text="What is happening in this audio?")) == (
        "<|user|><|audio|>What is happening in this audio?<|end|><|assistant|>")
    assert phi.chat_text(Prompt(text="Who are you?")) == "<|user|>Who are you?<|end|><|assistant|>"
    assert phi.chat_text(Prompt(text="hi", system="Be brief.")) == (
        "<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>")
    assert phi.default_system_prompt() is None


def test_audio_placeholder_expands_to_one_token_per_embedding(phi):
    audio_id = phi.tokenizer.convert_tokens_to_ids("<|audio|>")
    prompts = [Prompt(audio=clip(1.0)), Prompt(audio=clip(2.5, 1), text="Which choice?")]
    # 1 s: 98 frames of 25 ms every 10 ms -> ceil(98 / 8) = 13; 2.5 s: 248 -> 31.
    assert [phi.audio_token_count(len(p.audio)) for p in prompts] == [13, 31]
    inputs = phi.encode(prompts)
    assert (inputs["input_ids"] == audio_id).sum(-1).tolist() == [13, 31]
    assert inputs["audio_embed_sizes"].tolist() == [13, 31]
    assert inputs["audio_input_features"].shape == (2, 248, 80)
    assert inputs["attention_mask"].sum(-1).tolist() == [phi.prompt_length(p) for p in prompts]


def test_the_speech_adapter_is_on_for_audio_only(phi):
    phi.encode([Prompt(audio=clip(1.0))])
    assert all(layer.active_adapters == [SPEECH_ADAPTER] for layer in lora_layers(phi.model))
    text = Prompt(text="Which animal is a mammal?")
    before = phi.continuation_logprobs([text], ["B. whale"])[0]
    assert all(layer.active_adapters == [] for layer in lora_layers(phi.model))
    phi.continuation_logprobs([Prompt(audio=clip(1.0, 2))], ["B. whale"])
    assert np.array_equal(phi.continuation_logprobs([text], ["B. whale"])[0], before)


def test_text_prompts_run_the_backbone_itself(pair, phi):
    """With the adapter off, the decoder is Phi-4-mini's: the same prompt through the speech LLM and through a
    Phi3ForCausalLM holding its decoder weights gives the same log-probs."""
    from transformers import Phi3ForCausalLM

    text_llm = load_model(str(pair[0]), CPU)
    prompt, continuation = Prompt(text="Which animal is a mammal?"), "B. whale"
    assert phi.chat_text(prompt) == text_llm.chat_text(prompt)
    decoder = {k.replace(".base_layer", ""): v for k, v in phi.model.state_dict().items()
               if "embed_tokens_extend" not in k and "lora_" not in k}
    text_llm.model.load_state_dict(decoder)
    assert isinstance(text_llm.model, Phi3ForCausalLM)
    np.testing.assert_allclose(phi.continuation_logprobs([prompt], [continuation])[0],
                               text_llm.continuation_logprobs([prompt], [continuation])[0], atol=1e-5)


def test_batched_generation_equals_one_at_a_time(phi):
    assert_batched_equals_single(phi, [Prompt(text="Which animal is a mammal? " * n) for n in (1, 4)]
                                 + [Prompt(text="the sea")], GREEDY)
    # Clips of different lengths run in sub-batches (the conv subsampling sees the batch's padding).
    assert_batched_equals_single(phi, [Prompt(audio=clip(1.0, 1)), Prompt(audio=clip(2.5, 2), text="ok?"),
                                       Prompt(audio=clip(1.0, 3))], GREEDY)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logprobs_match_a_naive_forward(phi, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea " * 5)]
    if with_audio:
        prompts = [Prompt(audio=clip(s, 3), text=p.text) for p, s in zip(prompts, (1.0, 2.2))]
    continuations = ["B. whale", "a short poem about the sea"]
    for prompt, continuation, got in zip(prompts, continuations, phi.continuation_logprobs(prompts, continuations)):
        expected = naive_logprobs(phi, prompt, continuation)
        assert got.shape == expected.shape and got.shape[0] > 1
        np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize("with_audio", [False, True])
def test_continuation_logits_contract(phi, with_audio):
    prompts = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea")]
    if with_audio:  # two lengths: two sub-batches, re-assembled right-aligned
        prompts = [Prompt(audio=clip(s, 4), text=p.text) for p, s in zip(prompts, (1.0, 1.7))]
    assert_continuation_logits_contract(phi, prompts)


def test_gradients_reach_the_audio_encoder_and_projector(phi):
    logits, _, mask = phi.continuation_logits([Prompt(audio=clip(1.0, 8))], ["B. whale"])
    logits[mask].float().logsumexp(-1).sum().backward()
    assert phi.projector()[0].weight.grad is not None and phi.audio_encoder().embed.out.weight.grad is not None
    phi.model.zero_grad(set_to_none=True)


def test_clips_are_refused_only_when_too_short(phi):
    # No fixed window (clips past 500 embeddings, 40 s, run in chunks): nothing is truncated, so nothing is refused.
    assert phi.max_audio_seconds is None
    phi.check_audio(clip(45.0))
    with pytest.raises(ModelInputError, match="too short"):
        phi.generate([Prompt(audio=clip(0.02))], GREEDY)  # 320 samples: no 25 ms frame
    assert phi.generate([Prompt(audio=clip(0.025))], GREEDY)[0].n_new_tokens > 0  # one frame, one embedding


def test_the_audio_path_inside_the_embedding_layer_and_lora_targets(pair):
    model = load_model(str(pair[1]), CPU)  # a copy: LoRA is applied and unloaded (with the speech adapter)
    assert_distill_modules(model, "Phi4MultimodalAudioModel", "ModuleList", "Phi4MultimodalModel")
    embed = model.model.model.embed_tokens_extend.audio_embed
    assert model.audio_encoder() is embed.encoder
    assert list(model.projector()) == [embed.up_proj_for_speech, embed.down_proj_for_speech]
    # The decoder's qkv/o of 2 layers; the audio encoder, inside the same module, is not matched.
    names = model.lora_target_modules()
    assert len(names) == 4 and all("embed_tokens_extend" not in name for name in names)


def test_a_full_fine_tune_keeps_the_audio_encoder_and_projector_frozen(pair, tmp_path):
    """The audio encoder and projector sit inside the language model's module; unfreezing it leaves them frozen,
    and the vision path and the checkpoint's speech adapter too."""
    import shutil

    from speechlm_eval.distill.config import DistillConfig
    from speechlm_eval.distill.train import make_trainable

    with_adapter = load_model(str(pair[1]), CPU)
    make_trainable(with_adapter, DistillConfig(lora=False))
    trainable = [n for n, p in with_adapter.model.named_parameters() if p.requires_grad]
    assert trainable and not [n for n in trainable if f".{SPEECH_ADAPTER}." in n or "embed_tokens_extend" in n]
    shutil.copytree(pair[1], tmp_path / "no_adapter", ignore=shutil.ignore_patterns("speech-lora"))
    model = load_model(str(tmp_path / "no_adapter"), CPU)
    assert model.describe()["speech_adapter"] is False
    make_trainable(model, DistillConfig(lora=False))
    assert not any(p.requires_grad for p in model.audio_encoder().parameters())
    assert not any(p.requires_grad for p in model.projector().parameters())
    assert all(p.requires_grad for p in model.model.model.layers.parameters())


def test_distillation_keeps_the_speech_adapter_in_its_subfolder(pair, tmp_path):
    from speechlm_eval.models.phi4_multimodal import SPEECH_LORA, Phi4MultimodalModel
    from speechlm_eval.models.registry import get_family

    assert "distill" in get_family("phi4-multimodal").capabilities and Phi4MultimodalModel.speech_adapter_folder == SPEECH_LORA
    assert_distilled_keeps_its_speech_adapter(pair[1], pair[0], tmp_path / "run", SPEECH_LORA)


def test_the_text_llm_is_labelled_its_backbone(pair, phi):
    from speechlm_eval.backbone import backbone_identity

    identity = backbone_identity(phi, load_model(str(pair[0]), CPU))
    assert identity["label"] == "backbone", identity["reason"]


@pytest.mark.slow
def test_gap_end_to_end(pair, tmp_path):
    text_dir, speech_dir = pair
    results = assert_gap_run_is_complete(run_gap(speech_dir, text_dir, tmp_path / "run"), "phi4-multimodal")
    assert results["manifest"]["system_prompt"]["text"] is None
    assert results["manifest"]["text_llm_reference"]["label"] == "backbone"


@pytest.mark.slow
def test_a_full_fine_tune_runs_to_a_report_and_saves_the_speech_adapter_apart(pair, tmp_path):
    from safetensors.torch import load_file

    from speechlm_eval.models.phi4_multimodal import SPEECH_LORA

    assert_distill_runs_to_a_report(pair[1], pair[0], tmp_path / "run", lora=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    written = load_file(str(checkpoint / SPEECH_LORA / "adapter_model.safetensors"))
    shipped = load_file(str(pair[1] / SPEECH_LORA / "adapter_model.safetensors"))
    assert written.keys() == shipped.keys() and all(torch.equal(written[k], shipped[k]) for k in shipped)
    trained, original = load_file(str(checkpoint / "model.safetensors")), load_file(str(pair[1] / "model.safetensors"))
    assert trained.keys() == original.keys()  # the checkpoint's own layout: no peft names
    changed = [k for k in original if not torch.equal(trained[k], original[k])]
    assert changed and all(k.startswith("model.layers.") or k.startswith("model.embed_tokens.") or k.startswith(
        "model.norm.") or k.startswith("lm_head.") for k in changed), changed[:3]
    assert load_model(str(checkpoint), CPU).describe()["speech_adapter"] is True


def test_the_audio_cache_changes_no_answer(phi):
    from tests.models.family_contract import assert_audio_cache_answers_alike, clip as contract_clip

    assert_audio_cache_answers_alike(phi, [Prompt(audio=contract_clip(1.0, 1)), Prompt(audio=contract_clip(2.5, 2)),
                                           Prompt(audio=contract_clip(1.0, 3), text="ok?")])
