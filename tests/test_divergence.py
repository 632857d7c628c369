"""Per-token divergences (the diagnostics' KL/JSD) against direct float64 computations, in mask order."""

from __future__ import annotations

import math

import torch

from speechlm_eval.distill.losses import kd_loss
from speechlm_eval.divergence import per_token_divergence, token_jsd, token_kl
from tests.distill.test_losses import make_batch, naive_divergence


def test_per_token_kl_and_jsd_match_naive_in_mask_order():
    p, q, mask = make_batch(seed=13)
    kl = token_kl(p, q, mask)
    assert kl.shape == (int(mask.sum()),)
    expected = naive_divergence(p[mask].double().log_softmax(-1), q[mask].double().log_softmax(-1), "forward_kl")
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-6)
    jsd = token_jsd(p, q, mask)
    torch.testing.assert_close(jsd, token_jsd(q, p, mask))
    expected = naive_divergence(p[mask].double().log_softmax(-1), q[mask].double().log_softmax(-1), "jsd")
    torch.testing.assert_close(jsd.double(), expected, rtol=1e-5, atol=1e-6)
    assert (jsd <= math.log(2) + 1e-6).all()
    # The diagnostic's mean is the KD loss at τ = 1 (teacher p, student q).
    torch.testing.assert_close(kl.mean(), kd_loss(q, p, mask, temperature=1.0))
    assert per_token_divergence(p, q, mask, chunk_size=2).shape == kl.shape
