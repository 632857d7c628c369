"""Distillation beyond the organism's one-tokenizer Qwen2-Audio pair: a student whose tokenizer gives the teacher's
special ids to audio tokens (KD over the shared support), and the Qwen2.5-Omni thinker (no Qwen2-Audio module tree)."""

from __future__ import annotations

import json

import pytest
import torch

from speechlm_eval.distill.config import DistillConfig
from speechlm_eval.distill.train import distill
from speechlm_eval.distill.vocab import kd_support
from speechlm_eval.models.registry import LoadOptions, load_model
from tests.fixtures.real_pairs import AUDIO_SPECIALS, TEXT_ONLY_SPECIALS, build_real_shaped_pair
from tests.fixtures.tiny import TinySpec
from tests.fixtures.tiny_models import CORPUS
from tests.fixtures.tiny_omni import build_tiny_omni_pair

SMALL = {"max_examples": 8, "batch_size": 4, "max_response_tokens": 12, "lr": 1e-2, "epochs": 1, "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_kd_support_masks_tokens_that_mean_different_things(tmp_path):
    pair = build_real_shaped_pair(tmp_path / "pair")
    student = load_model(str(pair.speech_llm_clean), LoadOptions(device="cpu"))
    teacher = load_model(str(pair.backbone), LoadOptions(device="cpu"))
    support = kd_support(teacher.tokenizer, student.tokenizer)
    assert not support.is_prefix and support.size == len(teacher.tokenizer) - 3
    assert set(support.masked_teacher) == set(TEXT_ONLY_SPECIALS) and set(support.masked_student) == set(AUDIO_SPECIALS)
    # The same string sits at the same support position on both sides.
    t_vocab = {i: t for t, i in teacher.tokenizer.get_vocab().items()}
    s_vocab = {i: t for t, i in student.tokenizer.get_vocab().items()}
    assert all(t_vocab[int(a)] == s_vocab[int(b)] for a, b in zip(support.teacher_ids, support.student_ids))
    logits = torch.randn(2, 3, len(student.tokenizer))
    assert support.student_logits(logits).shape == (2, 3, support.size)


@pytest.mark.slow
def test_distill_a_real_shaped_pair_over_the_shared_support(tmp_path):
    pair = build_real_shaped_pair(tmp_path / "pair")
    out = tmp_path / "run"
    checkpoint = distill(DistillConfig(student=str(pair.speech_llm_clean), teacher=str(pair.backbone), out=out,
                                       **SMALL))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["kd_support"]["aligned"] == "by token string"
    assert manifest["kd_support"]["masked_student"] == 3 and "<|AUDIO|>" in manifest["kd_support"]["masked_student_tokens"]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert log and all(torch.isfinite(torch.tensor([r["loss_tt"], r["loss_st"]])).all() for r in log)
    load_model(str(checkpoint), LoadOptions(device="cpu"))  # the distilled student loads back


@pytest.mark.slow
@pytest.mark.parametrize("thinker_only", [False, True])
def test_distill_the_omni_thinker_to_a_before_after_report(tmp_path, thinker_only):
    from tests.models.family_contract import assert_distill_runs_to_a_report

    text_dir, speech_dir = build_tiny_omni_pair(CORPUS, tmp_path / "omni", TinySpec(vocab_size=400),
                                                thinker_only=thinker_only)
    manifest = assert_distill_runs_to_a_report(speech_dir, text_dir, tmp_path / "run", lora=True)
    assert manifest["student"]["family"] == "qwen2.5-omni"
    assert load_model(str(tmp_path / "run" / "checkpoint"), LoadOptions(device="cpu")).family == "qwen2.5-omni"


@pytest.mark.slow
def test_lora_writes_an_adapter_and_a_merged_student_that_both_load(tiny_pair, tmp_path):
    from peft import PeftModel

    speech, text = tiny_pair
    out = tmp_path / "lora"
    merged = distill(DistillConfig(student=str(speech), teacher=str(text), out=out, lora=True, **SMALL))
    assert merged == out / "checkpoint"
    adapter_dir = out / "adapter"
    assert (adapter_dir / "adapter_model.safetensors").exists() and (adapter_dir / "adapter_config.json").exists()
    from_adapter = load_model(str(adapter_dir), LoadOptions(device="cpu"))
    from_merged = load_model(str(merged), LoadOptions(device="cpu"))
    assert from_adapter.describe()["adapter_of"] == str(speech)
    prompt_ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = from_adapter.model(input_ids=prompt_ids).logits
        b = from_merged.model(input_ids=prompt_ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # peft's own loader takes the adapter onto the original student.
    base = load_model(str(speech), LoadOptions(device="cpu")).model
    assert isinstance(PeftModel.from_pretrained(base, str(adapter_dir)), PeftModel)
    only = distill(DistillConfig(student=str(speech), teacher=str(text), out=tmp_path / "nomerge", lora=True,
                                 merge=False, **SMALL))
    assert only.name == "adapter" and not (tmp_path / "nomerge" / "checkpoint").exists()


@pytest.mark.slow
def test_resume_loads_no_pickle_and_cleans_interrupted_writes(tiny_pair, tmp_path):
    speech, text = tiny_pair
    out = tmp_path / "run"
    config = dict(student=str(speech), teacher=str(text), out=out, **{**SMALL, "epochs": 2})
    distill(DistillConfig(**config, stop_after_steps=1))
    (state,) = sorted((out / "train_state").glob("step-*"))
    assert {p.name for p in state.iterdir()} >= {"rng-rank0.json", "rng-rank0.safetensors", "trainable.safetensors"}
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state": Payload()}, state / "optimizer.pt")  # a crafted file in the output folder
    (out / "train_state" / ".tmp-step-00000009").mkdir()
    (out / ".leftover.json.123.tmp").write_text("torn")
    from speechlm_eval.distill.config import ConfigError

    with pytest.raises(ConfigError, match="refusing to load"):
        distill(DistillConfig(**config, resume=True))
    assert not marker.exists()
    assert not (out / "train_state" / ".tmp-step-00000009").exists() and not (out / ".leftover.json.123.tmp").exists()
