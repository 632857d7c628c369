"""Distillation storage and loss figures: top-k cache vs full logits, top-k loss error, steps/s, chunked-loss memory.

Run: ``.venv/bin/python benchmarks/bench_distill.py [--threads 2] [--skip-memory]``; prints one JSON object.

1. ``storage``: bytes per response token of the top-k cache (k=64: float16 log-probs + int32 ids + float32 rest
   mass, measured on a written shard) vs full logits at Qwen2.5's real vocabulary (151,665) in float32 (and bf16),
   computed (V × bytes) and checked on a small written file. Target: ≥ 20× smaller.
2. ``topk_error``: relative error of the KD loss from a top-k teacher (k=64, float16-rounded as the cache stores it)
   vs the full teacher, for each tail option (``sampled``, the default: exact tempered tail mass + 64 sampled tail
   ids; ``bucket``; ``renormalize``), at τ = 1 and τ = 2, plus the cosine and relative error of the gradient w.r.t.
   the student logits. The loss compared is the mean over a batch of 256 response tokens (the sampled tail's
   per-token estimates are unbiased but noisy; a batch averages them, as a training step does). On (a) synthetic 151,665-id teachers of two shapes, ``lm_like`` (Gaussian bulk of
   logits, sd 2, plus a head of 40 plausible ids whose top logit is 18–30 above the bulk mean, exponential gaps) and
   ``zipf`` (p ∝ rank^−s, s ~ U(1.2, 2.5), random ids), the student = teacher + N(0, 1) logit noise; (b) the
   shipped organism's own logits (its text LLM teaching its speech LLM); and (c) the tiny random models' real logits (text LLM teacher, speech LLM student on text input) read back from a real
   cache. Each case prints the teacher's entropy and top-k mass so one can judge how realistic it is. Target: < 1%.
3. ``steps_per_s``: tiny models; one KD step = student forward + backward + AdamW step, with the teacher either run
   every step (forward under no_grad) or read from the cache.
4. ``peak_memory``: one subprocess per variant at V = 151,665, B = 2, T = 256 (all 512 tokens masked), float32
   logits: the peak resident-set growth (``ru_maxrss`` minus the RSS after the inputs exist; on a GPU, the growth of
   ``torch.cuda.max_memory_allocated``) of loss + backward, for
   the plain unchunked autograd loss and ``kd_loss`` at several chunk sizes. Reported with the gradient's own bytes
   (n·V·4, unavoidable) subtracted and expressed in float32 (n, V) or (chunk, V) copies (the analytic view).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/fixtures model builders

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from speechlm_eval.distill.losses import TopK, kd_loss, topk_from_logits

QWEN25_VOCAB = 151_665
K = 64
TAIL_SAMPLES = 64  # DistillConfig.tail_samples


# -- 1. storage ----------------------------------------------------------------------------------------------------


def storage(vocab: int = QWEN25_VOCAB, k: int = K) -> dict:
    from safetensors.torch import save_file

    from speechlm_eval.distill.teacher_cache import SHARD_DIR, TeacherCache

    examples, tokens = 64, 200
    gen = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache(tmp, teacher="bench", k=k, vocab_size=vocab)
        entries = []
        for _ in range(examples):
            lp = torch.randn(tokens, k, generator=gen).sort(-1, descending=True).values - 5
            entries.append((lp, torch.randint(0, vocab, (tokens, k), generator=gen), torch.full((tokens,), -3.0)))
        cache.write([f"e{i}" for i in range(examples)], entries)
        topk_bytes = sum(f.stat().st_size for f in (Path(tmp) / SHARD_DIR).iterdir()) / (examples * tokens)
    with tempfile.TemporaryDirectory() as tmp:
        cache = TeacherCache(tmp, teacher="bench", k=k, vocab_size=vocab, tail_samples=TAIL_SAMPLES,
                             tail_temperature=2.0)
        rows = torch.randn(4, 50, vocab, generator=gen)
        cache.write([f"e{i}" for i in range(4)],
                    [topk_from_logits(r, k, tail_samples=TAIL_SAMPLES, tail_temperature=2.0) for r in rows])
        sampled_bytes = sum(f.stat().st_size for f in (Path(tmp) / SHARD_DIR).iterdir()) / (4 * 50)
    with tempfile.TemporaryDirectory() as tmp:
        full_path = Path(tmp) / "full.safetensors"
        save_file({"logits": torch.zeros(8, vocab)}, str(full_path))
        full_measured = full_path.stat().st_size / 8
    full_fp32, full_bf16 = vocab * 4, vocab * 2
    return {
        "vocab": vocab,
        "k": k,
        "topk_layout": "per kept id float16 logprob + int32 id; per token float32 rest mass; per example int64 offset",
        "topk_bytes_per_token_measured": round(topk_bytes, 1),
        "topk_bytes_per_token_analytic": k * (2 + 4) + 4,
        "full_fp32_bytes_per_token": full_fp32,
        "full_fp32_bytes_per_token_measured": round(full_measured, 1),
        "full_bf16_bytes_per_token": full_bf16,
        "ratio_vs_full_fp32": round(full_fp32 / topk_bytes, 1),
        "ratio_vs_full_bf16": round(full_bf16 / topk_bytes, 1),
        "sampled_tail_layout": f"plus {TAIL_SAMPLES} tail ids (int32) with float16 logprobs and 2 float32 stats",
        "sampled_bytes_per_token_measured": round(sampled_bytes, 1),
        "sampled_bytes_per_token_analytic": k * (2 + 4) + 4 + TAIL_SAMPLES * (4 + 2) + 8,
        "sampled_ratio_vs_full_fp32": round(full_fp32 / sampled_bytes, 1),
        "target_ratio": 20,
    }


# -- 2. top-k loss error -------------------------------------------------------------------------------------------


def lm_like_teacher(n: int, vocab: int, gen: torch.Generator, head: int = 40) -> torch.Tensor:
    """(n, vocab): Gaussian bulk (sd 2) plus a head of ``head`` random ids 18–30 above the bulk mean."""
    logits = torch.empty(n, vocab).normal_(0, 2.0, generator=gen)
    top = torch.empty(n, 1).uniform_(18, 30, generator=gen)
    scale = torch.empty(n, 1).uniform_(0.3, 3.0, generator=gen)
    steps = torch.empty(n, head - 1).exponential_(1.0, generator=gen) * scale
    gaps = torch.cat([torch.zeros(n, 1), steps.cumsum(-1)], -1)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:head] for _ in range(n)])
    return logits.scatter_(-1, ids, torch.maximum(top - gaps, logits.gather(-1, ids)))


def zipf_teacher(n: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """(n, vocab): log p = −s·log(rank) + const, s ~ U(1.2, 2.5), ranks assigned to random ids."""
    exponent = torch.empty(n, 1).uniform_(1.2, 2.5, generator=gen)
    ranked = -exponent * torch.arange(1, vocab + 1, dtype=torch.float32).log()
    order = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(n)])
    return torch.empty(n, vocab).scatter_(-1, order, ranked)


def teacher_stats(teacher: torch.Tensor, mask: torch.Tensor, top: TopK) -> dict:
    rows = teacher[mask].float()
    logp = rows.log_softmax(-1)
    kept = torch.zeros_like(rows, dtype=torch.bool).scatter(-1, top.indices[mask], True)
    tail_tau2 = (rows / 2).log_softmax(-1).masked_fill(kept, -math.inf).logsumexp(-1).exp()
    return {
        "tokens": int(mask.sum()),
        "vocab": teacher.shape[-1],
        "entropy_nats_tau1": round(float(-(logp.exp() * logp).sum(-1).mean()), 3),
        "top1_mass_tau1": round(float(logp.max(-1).values.exp().mean()), 3),
        f"top{top.k}_mass_tau1": round(float((1 - top.rest_logprob[mask].exp()).mean()), 4),
        f"mass_outside_top{top.k}_tau2": round(float(tail_tau2.mean()), 3),
    }


def sampled_topk(teacher: torch.Tensor, tau: float, m: int = TAIL_SAMPLES) -> TopK:
    """The default cache's teacher at ``tau``: top-k, exact tempered tail mass, ``m`` tail ids (float16 log-probs)."""
    top = topk_from_logits(teacher, K, tail_samples=m, tail_temperature=tau, generator=torch.Generator().manual_seed(0))
    return dataclasses.replace(top, logprobs=top.logprobs.half().float(), tail_logprobs=top.tail_logprobs.half().float())


def compare_topk(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, top: TopK) -> dict:
    """Loss and gradient of each top-k tail option vs the full teacher, at τ = 1 and 2 (``sampled``: the default,
    its tail drawn for each τ as a run's cache is)."""

    def loss_and_grad(target, **kwargs):
        leaf = student.detach().clone().requires_grad_(True)
        value = kd_loss(leaf, target, mask, **kwargs)
        value.backward()
        return value.item(), leaf.grad[mask].double()

    out = {}
    for tau in (1.0, 2.0):
        full, full_grad = loss_and_grad(teacher, temperature=tau)
        row = {"full_loss": round(full, 5)}
        for tail in ("sampled", "bucket", "renormalize"):
            target = sampled_topk(teacher, tau) if tail == "sampled" else top
            value, grad = loss_and_grad(target, temperature=tau, topk_tail=tail)
            row[tail] = {
                "loss": round(value, 5),
                "rel_error": round((value - full) / full, 4),
                "grad_cosine": round(float((grad * full_grad).sum() / (grad.norm() * full_grad.norm())), 5),
                "grad_rel_error": round(float((grad - full_grad).norm() / full_grad.norm()), 4),
            }
        out[f"tau={tau:g}"] = row
    return out


def as_cached(top: TopK) -> TopK:
    """What the cache returns: float16-rounded log-probs, exact rest mass."""
    return TopK(top.logprobs.half().float(), top.indices, top.rest_logprob)


def topk_error_synthetic(tokens: int = 256, vocab: int = QWEN25_VOCAB) -> dict:
    out = {}
    for name, make in (("lm_like", lm_like_teacher), ("zipf", zipf_teacher)):
        gen = torch.Generator().manual_seed(1)
        teacher = make(tokens, vocab, gen).unsqueeze(0)
        student = teacher + torch.empty_like(teacher).normal_(0, 1.0, generator=gen)
        mask = torch.ones(1, tokens, dtype=torch.bool)
        top = as_cached(topk_from_logits(teacher, K))
        out[name] = {"teacher": teacher_stats(teacher, mask, top), **compare_topk(student, teacher, mask, top)}
    return out


# -- tiny models: real logits, cache, steps/s ----------------------------------------------------------------------


def tiny_setup(n_examples: int, max_new_tokens: int):
    from speechlm_eval.paths import cache_root
    from tests.fixtures.tiny import cached_random_pair
    from speechlm_eval.data.suite import load_suite, parse_suite
    from speechlm_eval.distill.vocab import check_vocab_compatible
    from speechlm_eval.models.base import GenerationConfig, Prompt
    from speechlm_eval.models.registry import LoadOptions, load_model

    speech_path, text_path = cached_random_pair(cache_root())
    student = load_model(str(speech_path), LoadOptions(device="cpu"))
    teacher = load_model(str(text_path), LoadOptions(device="cpu"))
    check_vocab_compatible(teacher.tokenizer, student.tokenizer)
    items, _ = load_suite(parse_suite("bundled"))
    texts = [item.text for item in items if item.text][:n_examples]
    prompts = [Prompt(text=t) for t in texts]
    # Targets = the teacher's own greedy answers (the paper's `--targets teacher` option), as token ids.
    targets = []
    for start in range(0, len(prompts), 16):
        answers = teacher.generate(prompts[start : start + 16], GenerationConfig(max_new_tokens=max_new_tokens))
        for generation in answers:
            ids = teacher.tokenizer(generation.text, add_special_tokens=False)["input_ids"] or [0]
            targets.append(ids[:max_new_tokens])
    return student, teacher, prompts, targets


def tiny_topk_error(student, teacher, prompts, targets, cache, ids) -> dict:
    from speechlm_eval.distill.vocab import align_logits, real_vocab_size

    vocab = real_vocab_size(teacher.tokenizer)
    with torch.no_grad():
        t_logits, _, mask = teacher.continuation_logits(prompts, targets)
        s_logits, _, _ = student.continuation_logits(prompts, targets)
    t_logits, s_logits = align_logits(t_logits, s_logits, vocab)
    top = cache.read(ids, length=mask.shape[1])
    return {"teacher": teacher_stats(t_logits, mask, top), **compare_topk(s_logits, t_logits, mask, top)}


def organism_topk_error(n_examples: int = 48) -> dict:
    """The shipped organism's own logits: its text LLM (teacher) and speech LLM (student, reading the question) on
    distillation questions, teacher-forced on the teacher's greedy answers, as the organism's distill run does."""
    from speechlm_eval.distill.data import load_distill_data
    from speechlm_eval.embedded import embedded_distill_data, embedded_models
    from speechlm_eval.models.base import GenerationConfig, Prompt
    from speechlm_eval.models.registry import LoadOptions, load_model

    speech_path, text_path = embedded_models()
    student = load_model(str(speech_path), LoadOptions(device="cpu"))
    teacher = load_model(str(text_path), LoadOptions(device="cpu"))
    rows = load_distill_data(str(embedded_distill_data()))[:n_examples]
    prompts = [Prompt(text=r.question) for r in rows]
    answers = teacher.generate(prompts, GenerationConfig(max_new_tokens=8))
    targets = [teacher.tokenizer(a.text, add_special_tokens=False)["input_ids"] or [0] for a in answers]
    vocab = len(teacher.tokenizer)
    with torch.no_grad():
        t_logits, _, mask = teacher.continuation_logits(prompts, targets)
        s_logits, _, _ = student.continuation_logits(prompts, targets)
    t_logits, s_logits = t_logits[..., :vocab], s_logits[..., :vocab]
    top = as_cached(topk_from_logits(t_logits, K))
    return {"teacher": teacher_stats(t_logits, mask, top), **compare_topk(s_logits, t_logits, mask, top)}


def steps_per_s(student, teacher, prompts, targets, cache, ids, batch_size: int, steps: int) -> dict:
    from speechlm_eval.distill.vocab import align_logits, real_vocab_size

    vocab = real_vocab_size(teacher.tokenizer)
    model = student.model
    for name, param in model.named_parameters():
        param.requires_grad_("audio_tower" not in name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batches = [list(range(s, min(s + batch_size, len(prompts)))) for s in range(0, len(prompts), batch_size)]

    def step(batch: list[int], use_cache: bool) -> float:
        started = time.perf_counter()
        batch_prompts, batch_targets = [prompts[i] for i in batch], [targets[i] for i in batch]
        if use_cache:
            width = max(len(targets[i]) for i in batch)
            teacher_side = cache.read([ids[i] for i in batch], length=width)
        else:
            with torch.no_grad():
                teacher_side, _, _ = teacher.continuation_logits(batch_prompts, batch_targets)
        teacher_s = time.perf_counter() - started
        logits, _, mask = student.continuation_logits(batch_prompts, batch_targets)
        if isinstance(teacher_side, torch.Tensor):
            teacher_side, logits = align_logits(teacher_side, logits, vocab)
        else:
            logits = logits[..., :vocab]
        loss = kd_loss(logits, teacher_side, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return teacher_s

    out = {}
    for use_cache in (False, True, False, True):  # interleaved twice: load on a shared machine drifts
        name = "cache" if use_cache else "recompute_teacher"
        for warm in range(2):
            step(batches[warm % len(batches)], use_cache)
        teacher_time, started = 0.0, time.perf_counter()
        for i in range(steps):
            teacher_time += step(batches[i % len(batches)], use_cache)
        elapsed = time.perf_counter() - started
        best = out.get(name)
        if best is None or elapsed < best[0]:
            out[name] = (elapsed, teacher_time)
    result = {
        "batch_size": batch_size,
        "steps": steps,
        "response_tokens_per_step": round(sum(len(t) for t in targets) / len(targets) * batch_size, 1),
    }
    for name, (elapsed, teacher_time) in out.items():
        result[f"{name}_steps_per_s"] = round(steps / elapsed, 2)
        result[f"{name}_teacher_ms_per_step"] = round(1000 * teacher_time / steps, 2)
    result["speedup"] = round(out["recompute_teacher"][0] / out["cache"][0], 2)
    return result


# -- 4. peak memory ------------------------------------------------------------------------------------------------

MEMORY_CHILD = r"""
import json, os, resource, sys, time
import torch
from speechlm_eval.distill.losses import kd_loss

variant, chunk, vocab, batch, length, threads = sys.argv[1], int(sys.argv[2]), *map(int, sys.argv[3:7])
torch.set_num_threads(threads)

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def unchunked(student, teacher, mask, tau=2.0):
    # The plain loss: whole-batch float32 log-softmaxes, masked mean (torchtune's non-chunked ForwardKLLoss shape).
    log_q = torch.log_softmax(student.float() / tau, -1)
    log_p = torch.log_softmax(teacher.float() / tau, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return tau**2 * kl[mask].mean()

device = "cuda" if torch.cuda.is_available() else "cpu"
small = torch.randn(1, 4, 64, device=device, requires_grad=True)  # pay first-call allocations before measuring
ones = torch.ones(1, 4, dtype=torch.bool, device=device)
kd_loss(small, torch.randn(1, 4, 64, device=device), ones).backward()
unchunked(small, torch.randn(1, 4, 64, device=device), ones).backward()
if variant == "topk":  # built directly (values do not matter here), so no full teacher ever raises the peak
    from speechlm_eval.distill.losses import TopK
    teacher = TopK(torch.randn(batch, length, 64, device=device).sort(-1, descending=True).values - 3,
                   torch.randint(0, vocab, (batch, length, 64), device=device),
                   torch.full((batch, length), -2.0, device=device))
else:
    teacher = torch.empty(batch, length, vocab, device=device).normal_(0, 2)
student = torch.empty(batch, length, vocab, device=device).normal_(0, 2).requires_grad_(True)
mask = torch.ones(batch, length, dtype=torch.bool, device=device)
if device == "cuda":  # allocated tensor bytes, exact
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = peak_before = torch.cuda.memory_allocated()
else:
    before = rss()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
started = time.perf_counter()
if variant == "unchunked":
    unchunked(student, teacher, mask).backward()
else:
    kd_loss(student, teacher, mask, chunk_size=chunk).backward()
if device == "cuda":
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
else:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
seconds = time.perf_counter() - started
print(json.dumps({"before": before, "peak_before": peak_before, "peak": peak, "seconds": seconds,
                  "device": device}))
"""


# glibc keeps freed blocks below its (dynamic, up to 32 MB) mmap threshold in the heap, so RSS would count dead
# chunks; a 1 MB threshold makes every large tensor its own mapping, returned on free: RSS then tracks live tensors.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_TRIM_THRESHOLD_": "1048576"}


def peak_memory(threads: int, vocab: int = QWEN25_VOCAB, batch: int = 2, length: int = 256) -> dict:
    n = batch * length
    grad_bytes = n * vocab * 4
    variants = [("unchunked", n), ("kd_loss", n), ("kd_loss", 128), ("kd_loss", 32), ("topk", 128)]
    out = {
        "shape": [batch, length, vocab],
        "logits_dtype": "float32",
        "method": (
            "CPU: peak RSS growth during loss+backward in a fresh subprocess (ru_maxrss - RSS after inputs exist), "
            "glibc mmap threshold 1 MB so freed tensors leave RSS; CUDA (when present): growth of "
            "torch.cuda.max_memory_allocated"
        ),
        "gradient_bytes": grad_bytes,
    }
    for variant, chunk in variants:
        result = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, variant, *map(str, (chunk, vocab, batch, length, threads))],
            capture_output=True, text=True, check=True, env={**os.environ, **MALLOC_ENV},
        )
        measured = json.loads(result.stdout)
        growth = measured["peak"] - max(measured["before"], measured["peak_before"])
        extra = growth - grad_bytes
        name = {"unchunked": "unchunked_autograd", "kd_loss": f"kd_loss_chunk{chunk}",
                "topk": f"kd_loss_chunk{chunk}_topk64"}[variant]
        rows = n if variant == "unchunked" else min(chunk, n)
        block = rows * vocab * 4
        out[name] = {
            "peak_growth_mb": round(growth / 2**20, 1),
            "beyond_gradient_mb": round(extra / 2**20, 1),
            "float32_blocks_beyond_gradient": round(extra / block, 2),
            "block": f"({rows}, {vocab}) float32 = {block / 2**20:.0f} MB",
            "seconds": round(measured["seconds"], 2),
            "device": measured["device"],
        }
    base = out["unchunked_autograd"]["peak_growth_mb"]
    for name in ("kd_loss_chunk128", "kd_loss_chunk32"):
        out[f"ratio_unchunked_over_{name}"] = round(base / out[name]["peak_growth_mb"], 2)
    # The same per-block constants, extrapolated to a training-size batch (analytic, not measured).
    n_big = 8 * 512
    unchunked_big = out["unchunked_autograd"]["float32_blocks_beyond_gradient"] * n_big * vocab * 4
    chunked_big = out["kd_loss_chunk128"]["float32_blocks_beyond_gradient"] * 128 * vocab * 4
    out["extrapolated_B8_T512_beyond_gradient_mb"] = {
        "unchunked_autograd": round(unchunked_big / 2**20), "kd_loss_chunk128": round(chunked_big / 2**20),
        "ratio": round(unchunked_big / chunked_big, 1),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report: dict = {"threads": args.threads, "torch": torch.__version__}
    report["storage"] = storage()
    report["topk_error"] = {"synthetic_151665": topk_error_synthetic(), "organism_real_logits": organism_topk_error()}
    report["section_s"] = {"storage+synthetic": round(time.perf_counter() - started, 1)}

    from speechlm_eval.distill.teacher_cache import build_teacher_cache

    student, teacher, prompts, targets = tiny_setup(args.examples, args.max_new_tokens)
    ids = [f"bench/{i}" for i in range(len(prompts))]
    with tempfile.TemporaryDirectory() as tmp:
        build_started = time.perf_counter()
        cache = build_teacher_cache(teacher, prompts, targets, ids, tmp, k=K, batch_size=args.batch_size)
        build_s = time.perf_counter() - build_started
        report["topk_error"]["tiny_models_real_logits"] = tiny_topk_error(
            student, teacher, prompts, targets, cache, ids
        )
        report["steps_per_s"] = {
            "models": "tiny random pair (tests.fixtures.tiny.cached_random_pair): student Qwen2-Audio on text input, teacher Qwen2",
            "cache_build_s": round(build_s, 2),
            "cache_build_examples": len(ids),
            **steps_per_s(student, teacher, prompts, targets, cache, ids, args.batch_size, args.steps),
        }
    report["section_s"]["tiny_models"] = round(time.perf_counter() - started - sum(report["section_s"].values()), 1)
    if not args.skip_memory:
        report["peak_memory"] = peak_memory(args.threads)
        report["section_s"]["memory"] = round(time.perf_counter() - started - sum(report["section_s"].values()), 1)
    report["total_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
