"""The on-disk top-k teacher cache: round trip, resume, refused mismatches, memory-mapped reads, crash leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from speechlm_eval.distill.losses import kd_loss, topk_from_logits
from speechlm_eval.distill.teacher_cache import (
    INDEX_FILE,
    SHARD_DIR,
    TeacherCache,
    TeacherCacheMismatchError,
    build_teacher_cache,
)
from speechlm_eval.models.base import Prompt
from speechlm_eval.models.registry import LoadOptions, load_model

K, VOCAB = 8, 300
PROMPTS = [Prompt(text="Which animal is a mammal?"), Prompt(text="the sea " * 4), Prompt(text="Is Paris in France?"),
           Prompt(text="Write a poem."), Prompt(text="Transcribe the audio."), Prompt(text="hi")]
TARGETS = ["B. whale", "a short poem about the sea", "yes", "the sea is wide and the sea is deep", "noon", "hello"]
IDS = [f"ex{i}" for i in range(len(PROMPTS))]


def random_entry(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    top = topk_from_logits(torch.randn(n, VOCAB, generator=gen) * 3, K)
    return top.logprobs, top.indices, top.rest_logprob


def test_round_trip_is_right_aligned_and_equals_the_in_memory_topk(tmp_path):
    cache = TeacherCache(tmp_path, teacher="teacher-a", k=K, vocab_size=VOCAB)
    entries = {f"e{i}": random_entry(n, i) for i, n in enumerate([5, 0, 3, 7])}
    cache.write(["e0", "e1"], [entries["e0"], entries["e1"]])
    cache.write(["e2", "e3"], [entries["e2"], entries["e3"]])
    reopened = TeacherCache.open(tmp_path)
    assert len(reopened) == 4 and "e3" in reopened and "e9" not in reopened
    order = ["e3", "e1", "e0", "e2"]
    batch = reopened.read(order)
    assert batch.logprobs.shape == (4, 7, K) and batch.indices.dtype == torch.long
    for row, example_id in enumerate(order):
        lp, ids, rest = entries[example_id]
        n = lp.shape[0]
        assert batch.mask[row].sum() == n and batch.mask[row, 7 - n :].all()
        torch.testing.assert_close(batch.logprobs[row, 7 - n :], lp.half().float())  # float16 on disk
        assert torch.equal(batch.indices[row, 7 - n :], ids)
        torch.testing.assert_close(batch.rest_logprob[row, 7 - n :], rest)  # float32 on disk: exact
    assert reopened.read(["e0"], length=9).mask[0].tolist() == [False] * 4 + [True] * 5
    with pytest.raises(ValueError, match="shorter"):
        reopened.read(["e3"], length=3)
    with pytest.raises(KeyError, match="e9"):
        reopened.read(["e9"])
    with pytest.raises(ValueError, match="already cached"):
        reopened.write(["e2"], [entries["e2"]])


def test_float32_cache_is_exact_and_wrong_shapes_or_ids_are_refused(tmp_path):
    cache = TeacherCache(tmp_path, teacher="t", k=K, vocab_size=VOCAB, dtype="float32")
    lp, ids, rest = random_entry(4, 0)
    cache.write(["a"], [(lp, ids, rest)])
    assert torch.equal(cache.read(["a"]).logprobs[0], lp)
    with pytest.raises(ValueError, match=r"\(T, 8\)"):
        cache.write(["b"], [(lp[:, :3], ids[:, :3])])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        cache.write(["c"], [(lp, ids + VOCAB)])
    assert "b" not in cache and "c" not in cache


@pytest.mark.parametrize(
    "change",
    [{"teacher": "teacher-b"}, {"k": K + 1}, {"vocab_size": VOCAB + 1}, {"dtype": "float32"},
     {"extra": {"targets": "teacher"}}],
)
def test_opening_with_another_teacher_k_vocab_or_dtype_is_refused(tmp_path, change):
    settings = {"teacher": "teacher-a", "k": K, "vocab_size": VOCAB, "dtype": "float16", "extra": {"targets": "data"}}
    TeacherCache(tmp_path, **settings).write(["a"], [random_entry(2, 0)])
    field = next(iter(change))
    with pytest.raises(TeacherCacheMismatchError, match=f"{field}: cache has"):
        TeacherCache(tmp_path, **{**settings, **change})
    assert TeacherCache(tmp_path, **settings).read(["a"]).mask.sum() == 2  # the cache itself is untouched


def test_k_zero_means_no_cache(tmp_path):
    with pytest.raises(ValueError, match="k = 0 means no cache"):
        TeacherCache(tmp_path / "c", teacher="t", k=0, vocab_size=VOCAB)
    assert build_teacher_cache(None, PROMPTS, TARGETS, IDS, tmp_path / "c", k=0) is None
    assert not (tmp_path / "c").exists()


def test_a_torn_index_line_and_a_leftover_temp_shard_are_ignored(tmp_path):
    cache = TeacherCache(tmp_path, teacher="t", k=K, vocab_size=VOCAB)
    cache.write(["a"], [random_entry(3, 0)])
    (tmp_path / SHARD_DIR / ".shard-x.safetensors.tmp-1").write_bytes(b"half a file")
    with open(tmp_path / INDEX_FILE, "a") as index:
        index.write('{"shard": "shard-gone.safetensors", "ids": ["b"')  # crash mid-line
    reopened = TeacherCache.open(tmp_path)
    assert "a" in reopened and "b" not in reopened and len(reopened) == 1
    reopened.write(["b"], [random_entry(2, 1)])
    assert TeacherCache.open(tmp_path).read(["b"]).mask.sum() == 2


class CountingTeacher:
    """The real adapter, counting the examples its teacher-forced forward sees."""

    def __init__(self, inner) -> None:
        self.inner, self.examples = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def continuation_logits(self, prompts, continuations):
        self.examples += len(prompts)
        return self.inner.continuation_logits(prompts, continuations)


@pytest.fixture(scope="module")
def teacher(tiny_pair):
    return load_model(str(tiny_pair[1]), LoadOptions(device="cpu"))


def test_build_stores_the_teachers_topk_and_resumes_with_only_the_missing(tmp_path, teacher):
    counting = CountingTeacher(teacher)
    build_teacher_cache(counting, PROMPTS[:3], TARGETS[:3], IDS[:3], tmp_path, k=K, batch_size=2)
    assert counting.examples == 3
    first_shards = set(os.listdir(tmp_path / SHARD_DIR))
    cache = build_teacher_cache(counting, PROMPTS, TARGETS, IDS, tmp_path, k=K, batch_size=4, examples_per_shard=2)
    assert counting.examples == 3 + 3 and len(cache) == len(IDS)
    assert first_shards < set(os.listdir(tmp_path / SHARD_DIR))
    assert build_teacher_cache(counting, PROMPTS, TARGETS, IDS, tmp_path, k=K) is not None
    assert counting.examples == 6  # everything cached: no teacher forward at all
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["k"] == K and meta["temperature"] == 1.0 and meta["vocab_size"] == len(teacher.tokenizer)

    # Each example, against a one-at-a-time teacher forward: the stored log-probs are its log-softmax at the stored ids.
    for prompt, target, example_id in zip(PROMPTS, TARGETS, IDS):
        with torch.no_grad():
            logits, _, mask = teacher.continuation_logits([prompt], [target])
        full = torch.log_softmax(logits[0][mask[0]].float(), -1)
        lp, ids, rest = cache.read_one(example_id)
        assert lp.shape == (int(mask.sum()), K)
        torch.testing.assert_close(lp, full.gather(-1, ids), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(lp[:, 0], full.max(-1).values, atol=2e-3, rtol=1e-3)
        kept = torch.zeros_like(full, dtype=torch.bool).scatter(-1, ids, True)
        torch.testing.assert_close(rest, full.masked_fill(kept, -torch.inf).logsumexp(-1), atol=1e-4, rtol=1e-4)

    # The cached batch drives the loss exactly as the in-memory top-k does (up to float16 storage).
    with torch.no_grad():
        logits, _, mask = teacher.continuation_logits(PROMPTS, TARGETS)
    student = logits + torch.randn(logits.shape, generator=torch.Generator().manual_seed(0))
    cached = cache.read(IDS, length=logits.shape[1])
    assert torch.equal(cached.mask, mask)
    in_memory = topk_from_logits(logits, K)
    for tau in (1.0, 2.0):
        torch.testing.assert_close(kd_loss(student, cached, mask, temperature=tau),
                                   kd_loss(student, in_memory, mask, temperature=tau), rtol=2e-3, atol=1e-4)


def test_a_different_teacher_is_refused_by_build(tmp_path, teacher, tiny_pair):
    build_teacher_cache(teacher, PROMPTS[:1], TARGETS[:1], IDS[:1], tmp_path, k=K)
    other = load_model(str(tiny_pair[0]), LoadOptions(device="cpu"))  # the speech LLM: another fingerprint
    with pytest.raises(TeacherCacheMismatchError, match="teacher: cache has"):
        build_teacher_cache(other, PROMPTS[:1], TARGETS[:1], IDS[:1], tmp_path, k=K)
    with pytest.raises(TeacherCacheMismatchError, match="k: cache has 8, asked 4"):
        build_teacher_cache(teacher, PROMPTS[:1], TARGETS[:1], IDS[:1], tmp_path, k=4)


MEASURE_RSS = r"""
import os, sys
from speechlm_eval.distill.teacher_cache import TeacherCache

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cache = TeacherCache.open(sys.argv[1])
cache.read(["warm-up"])  # another shard: imports and first-call costs are paid here
before = rss()
cache.read(["e80"])  # opens the big shard and reads one example
one = rss() - before
handle = cache._handle(cache._index["e80"][0])  # control: touch the whole shard through the same mapping
total = float(handle.get_tensor("logprobs").float().sum()) + float(handle.get_tensor("indices").sum())
print(one, rss() - before)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
def test_reading_one_example_maps_its_rows_not_the_shard(tmp_path):
    cache = TeacherCache(tmp_path, teacher="t", k=64, vocab_size=50_000)
    cache.write(["warm-up"], [(torch.zeros(2, 64), torch.ones(2, 64, dtype=torch.long), torch.zeros(2))])
    n_examples, tokens = 110, 1000  # one shard of ~42 MB
    entry = (torch.zeros(tokens, 64), torch.ones(tokens, 64, dtype=torch.long), torch.zeros(tokens))
    cache.write([f"e{i}" for i in range(n_examples)], [entry] * n_examples)
    shard_bytes = max(f.stat().st_size for f in (tmp_path / SHARD_DIR).iterdir())
    assert shard_bytes > 40e6
    result = subprocess.run([sys.executable, "-c", MEASURE_RSS, str(tmp_path)], capture_output=True, text=True,
                            check=True)
    one, everything = (int(x) for x in result.stdout.split())
    assert everything > 0.8 * shard_bytes  # the measurement sees a whole-shard read ...
    assert one < 0.5 * shard_bytes  # ... and one example costs a few pages (~8 MB measured: 2 MB huge pages), not it
