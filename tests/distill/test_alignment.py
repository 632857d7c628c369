"""The alignment losses (st_hidden, st_prefix, st_self) against direct float64 computations, their masking, and the
channels end to end on the tiny Qwen2-Audio pair."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from speechlm_eval.distill.alignment import hidden_alignment_loss, prefix_kl, self_distillation_kl
from speechlm_eval.distill.config import ConfigError, DistillConfig
from speechlm_eval.models.hf_runtime import pool_prompt

B, T, V, H = 3, 6, 11, 8


def batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    text, audio = torch.randn(B, T, V, generator=gen) * 2, torch.randn(B, T, V, generator=gen) * 2
    mask = torch.zeros(B, T, dtype=torch.bool)
    for row, n in enumerate([T, 3, 1]):  # right-aligned continuations
        mask[row, T - n :] = True
    text[~mask], audio[~mask] = math.nan, math.inf  # garbage outside the mask must never be read
    return text, audio, mask


def naive_kl(p_logits, q_logits, tau):
    log_p, log_q = (p_logits.double() / tau).log_softmax(-1), (q_logits.double() / tau).log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_self_distillation_is_the_mean_token_kl_over_the_mask(tau):
    text, audio, mask = batch()
    expected = naive_kl(text[mask], audio[mask], tau).mean() * tau**2
    torch.testing.assert_close(self_distillation_kl(text, audio, mask, tau).double(), expected, rtol=1e-5, atol=1e-6)


def test_prefix_kl_reads_only_each_rows_first_positions():
    text, audio, mask = batch(1)
    first = [(0, 0), (1, 3), (2, 5)]  # each row's first response position
    expected = torch.stack([naive_kl(text[b, t], audio[b, t], 1.0) for b, t in first]).mean()
    torch.testing.assert_close(prefix_kl(text, audio, mask, positions=1).double(), expected, rtol=1e-5, atol=1e-6)
    two = [(0, 0), (0, 1), (1, 3), (1, 4), (2, 5)]  # the 1-token row has no second position
    expected = torch.stack([naive_kl(text[b, t], audio[b, t], 1.0) for b, t in two]).mean()
    torch.testing.assert_close(prefix_kl(text, audio, mask, positions=2).double(), expected, rtol=1e-5, atol=1e-6)


def test_the_text_side_is_a_stop_gradient_target():
    text, audio, mask = batch(2)
    text = text.nan_to_num().requires_grad_(True)
    audio = audio.nan_to_num().requires_grad_(True)
    self_distillation_kl(text, audio, mask).backward()
    assert text.grad is None and audio.grad is not None and (audio.grad[~mask] == 0).all()
    assert self_distillation_kl(audio.detach(), audio.detach(), mask).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_alignment_cosine_and_mse():
    gen = torch.Generator().manual_seed(3)
    heard, typed = torch.randn(B, 2, H, generator=gen), torch.randn(B, 2, H, generator=gen)
    cos = torch.nn.functional.cosine_similarity(heard.double(), typed.double(), dim=-1)
    torch.testing.assert_close(hidden_alignment_loss(heard, typed).double(), (1 - cos).mean())
    torch.testing.assert_close(hidden_alignment_loss(heard, typed, "mse").double(),
                               ((heard.double() - typed.double()) ** 2).mean())
    assert hidden_alignment_loss(typed, typed).item() == pytest.approx(0.0, abs=1e-6)
    heard.requires_grad_(True)
    target = typed.clone().requires_grad_(True)
    hidden_alignment_loss(heard, target).backward()
    assert target.grad is None and heard.grad is not None


def test_pooling_over_a_left_padded_prompt():
    hidden = torch.arange(2 * 4 * 2, dtype=torch.float32).reshape(2, 4, 2)
    attention = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    torch.testing.assert_close(pool_prompt(hidden, attention, "last"), hidden[:, -1])
    torch.testing.assert_close(pool_prompt(hidden, attention, "mean"),
                               torch.stack([hidden[0].mean(0), hidden[1, 2:].mean(0)]))


def test_channel_names_are_checked():
    with pytest.raises(ConfigError, match="st_hidden"):
        DistillConfig(student="s", teacher="t", channels="tt,st_hiden")
    with pytest.raises(ConfigError, match="align_layers"):
        DistillConfig(student="s", teacher="t", channels="st_hidden", align_layers="last")
    assert DistillConfig(student="s", teacher="t", channels="st_self,tt").active_channels() == ("tt", "st_self")


SMALL = {"max_examples": 8, "batch_size": 4, "max_response_tokens": 12, "lr": 5e-3, "epochs": 2, "seed": 0}


@pytest.mark.slow
@pytest.mark.parametrize("channels", ["tt,st_hidden", "st_prefix", "st_self", "tt,st,st_hidden,st_prefix,st_self"])
def test_alignment_channels_train_on_the_tiny_pair(tiny_pair, tmp_path, channels):
    from speechlm_eval.distill.train import distill
    from speechlm_eval.models.registry import LoadOptions, load_model

    speech, text = tiny_pair
    torch.set_num_threads(1)
    out = tmp_path / "run"
    checkpoint = distill(DistillConfig(student=str(speech), teacher=str(text), out=out, channels=channels,
                                       align_layers="1,-1", **SMALL))
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    names = {f"loss_{c}" for c in channels.split(",")}
    assert all(names <= set(row) for row in log) and all(math.isfinite(row["loss"]) for row in log)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["channels"] == [c for c in ("tt", "st", "st_hidden", "st_prefix", "st_self") if c in names
                                    or f"loss_{c}" in names]
    if "tt" not in channels and "st," not in channels + ",":
        assert not (out / "teacher_cache").exists()  # the alignment channels alone need no teacher
    assert Path(checkpoint).exists() and load_model(str(checkpoint), LoadOptions(device="cpu")).accepts_audio
