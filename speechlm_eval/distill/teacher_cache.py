"""The teacher's top-k log-probabilities per response token, computed once and stored on disk for every epoch and run.

Layout of a cache directory::

    meta.json            teacher fingerprint, k, temperature (= 1), vocab size, dtype, format, extra; checked on open
    index.jsonl          one line per shard: {"shard": name, "ids": [example ids in row order]}
    shards/<name>.safetensors
        logprobs      (N_tokens, k)  float16 (default) or float32   log p at τ = 1 under the full softmax
        indices       (N_tokens, k)  int32                          vocabulary ids
        rest_logprob  (N_tokens,)    float32                        log of the mass outside the k ids (exact)
        offsets       (n_examples + 1,) int64                       example r owns rows offsets[r]:offsets[r+1]
      and, in a cache with tail samples (``tail_samples`` = m > 0, for the run's temperature τ):
        tail_indices  (N_tokens, m)  int32     ids drawn from the teacher's tempered tail (outside the k ids)
        tail_logprobs (N_tokens, m)  float16   their log p at τ = 1
        tail_stats    (N_tokens, 2)  float32   log Z_τ and log of the tempered tail mass (exact)

A shard is written to a temporary file and renamed into place (``os.replace``) before its index line is appended, so
an index line always names a complete shard; a crash leaves at most an unreferenced shard and a torn last line, both
ignored, and those examples are recomputed on resume. The index is appended to rather than rewritten, so a build of a
million examples stays linear. Shards are read memory-mapped (``safe_open(...).get_slice``): reading one example
touches its rows only.

``k = 0`` means no cache: the caller computes full teacher logits on the fly (:func:`build_teacher_cache` returns
``None``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from speechlm_eval.distill.losses import REST_FLOOR, TopK, topk_from_logits
from speechlm_eval.progress import stage
from speechlm_eval.distill.vocab import cut_padded_vocab, real_vocab_size
from speechlm_eval.records import write_atomic

CACHE_FORMAT = 1
META_FILE, INDEX_FILE, SHARD_DIR = "meta.json", "index.jsonl", "shards"
CacheDType = Literal["float16", "float32"]
_TORCH_DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "float32": torch.float32}


class TeacherCacheMismatchError(ValueError):
    """An existing cache was built for another teacher, k, vocabulary or dtype."""


def teacher_fingerprint(model: Any) -> str:
    """A short hash of the teacher adapter's identity (``describe()`` without the device it runs on)."""
    identity = {key: value for key, value in model.describe().items() if key != "device"}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


class TeacherCache:
    """Top-k teacher log-probs per example on disk; ``write`` appends shards, ``read`` returns a padded :class:`TopK`.

    Opening a directory that already holds a cache checks its ``meta.json`` against ``teacher``/``k``/``vocab_size``
    /``dtype``/``extra`` and raises :class:`TeacherCacheMismatchError` naming every field that differs. Entries are
    keyed by example id only: put whatever decides an example's (prompt, target) and is not in its id into ``extra``
    (e.g. ``{"targets": "teacher", "system_prompt": ...}``) so a cache built for other targets is refused.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        *,
        teacher: str,
        k: int,
        vocab_size: int,
        dtype: CacheDType = "float16",
        extra: Mapping[str, Any] | None = None,
        tail_samples: int = 0,
        tail_temperature: float | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k={k}: a teacher cache needs k >= 1 (k = 0 means no cache: compute full logits)")
        if dtype not in _TORCH_DTYPES:
            raise ValueError(f"cache dtype must be one of {sorted(_TORCH_DTYPES)}, got {dtype!r}")
        self.dir = Path(cache_dir)
        self.meta = {"format": CACHE_FORMAT, "teacher": teacher, "k": k, "temperature": 1.0,
                     "vocab_size": vocab_size, "dtype": dtype, "extra": json.loads(json.dumps(dict(extra or {}))),
                     "tail_samples": int(tail_samples),
                     "tail_temperature": float(tail_temperature) if tail_samples else None}
        self.dir.joinpath(SHARD_DIR).mkdir(parents=True, exist_ok=True)
        with self._lock():
            meta_path = self.dir / META_FILE
            if meta_path.exists():
                found = json.loads(meta_path.read_text())
                differ = {key: (found.get(key), value) for key, value in self.meta.items() if found.get(key) != value}
                if differ:
                    detail = ", ".join(f"{key}: cache has {old!r}, asked {new!r}" for key, (old, new) in differ.items())
                    raise TeacherCacheMismatchError(
                        f"teacher cache {self.dir} was built differently ({detail}); use another --cache-dir or "
                        "delete this one"
                    )
            else:
                write_atomic(meta_path, json.dumps(self.meta, indent=2, sort_keys=True))
        self._index: dict[str, tuple[str, int]] = {}
        self._shards: dict[str, Any] = {}  # shard name -> open safe_open handle (shards never change once written)
        self._offsets: dict[str, Tensor] = {}
        self._reload_index()

    @classmethod
    def open(cls, cache_dir: str | Path) -> TeacherCache:
        """Open an existing cache with the settings its ``meta.json`` records."""
        meta_path = Path(cache_dir) / META_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"no teacher cache at {cache_dir} ({META_FILE} missing)")
        meta = json.loads(meta_path.read_text())
        return cls(cache_dir, teacher=meta["teacher"], k=meta["k"], vocab_size=meta["vocab_size"], dtype=meta["dtype"],
                   extra=meta.get("extra"), tail_samples=meta.get("tail_samples", 0),
                   tail_temperature=meta.get("tail_temperature"))

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def tail_samples(self) -> int:
        return int(self.meta.get("tail_samples") or 0)

    def __contains__(self, example_id: object) -> bool:
        return example_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def write(
        self,
        example_ids: Sequence[str],
        topk: Sequence[tuple[Tensor, ...] | TopK],
    ) -> None:
        """Append one shard holding these examples.

        Each entry of ``topk`` is ``(logprobs (T_i, k), indices (T_i, k))`` at τ = 1, optionally with
        ``rest_logprob (T_i,)``; without it the rest mass is derived as ``1 − Σ exp(logprobs)`` (in float32, before
        the cache's float16 rounding). A cache with tail samples takes :class:`TopK` entries that carry them
        (``topk_from_logits(..., tail_samples=m)``). Ids already cached (or repeated) are refused.
        """
        tails = []
        if self.tail_samples:
            for example_id, entry in zip(example_ids, topk):
                if not isinstance(entry, TopK) or entry.tail_samples != self.tail_samples:
                    raise ValueError(f"{example_id}: this cache holds {self.tail_samples} tail samples per token; "
                                     "write TopK entries that carry them")
                tails.append((entry.tail_indices, entry.tail_logprobs, entry.tail_stats))
        topk = [(e.logprobs, e.indices, e.rest_logprob) if isinstance(e, TopK) else e for e in topk]
        if len(example_ids) != len(topk):
            raise ValueError(f"{len(example_ids)} example ids for {len(topk)} top-k entries")
        if not example_ids:
            return
        if len(set(example_ids)) != len(example_ids):
            raise ValueError("example ids repeat within one write")
        logprobs, indices, rests = [], [], []
        for example_id, entry in zip(example_ids, topk):
            lp, ids = entry[0].detach().cpu().float(), entry[1].detach().cpu()
            if lp.dim() != 2 or lp.shape != ids.shape or lp.shape[1] != self.k:
                raise ValueError(f"{example_id}: expected logprobs and indices (T, {self.k}), got "
                                 f"{tuple(lp.shape)} and {tuple(ids.shape)}")
            if len(entry) > 2:
                rest = entry[2].detach().cpu().float().reshape(-1)
            else:
                rest = torch.log((1 - lp.exp().sum(-1)).clamp_min(REST_FLOOR))
            logprobs.append(lp)
            indices.append(ids)
            rests.append(rest)
        all_ids = torch.cat(indices)
        if all_ids.numel() and not 0 <= int(all_ids.min()) <= int(all_ids.max()) < self.meta["vocab_size"]:
            raise ValueError(f"top-k ids outside the vocabulary 0..{self.meta['vocab_size'] - 1}")
        lengths = torch.tensor([0] + [lp.shape[0] for lp in logprobs], dtype=torch.int64)
        tensors = {
            "logprobs": torch.cat(logprobs).to(_TORCH_DTYPES[self.meta["dtype"]]).contiguous(),
            "indices": all_ids.to(torch.int32).contiguous(),
            "rest_logprob": torch.cat(rests).contiguous(),
            "offsets": lengths.cumsum(0),
        }
        if tails:
            tensors.update({
                "tail_indices": torch.cat([t[0].detach().cpu() for t in tails]).to(torch.int32).contiguous(),
                "tail_logprobs": torch.cat([t[1].detach().cpu().float() for t in tails]).to(
                    _TORCH_DTYPES[self.meta["dtype"]]).contiguous(),
                "tail_stats": torch.cat([t[2].detach().cpu().float() for t in tails]).contiguous(),
            })
        from safetensors.torch import save

        with self._lock():
            self._reload_index()
            already = [i for i in example_ids if i in self._index]
            if already:
                raise ValueError(f"{len(already)} example(s) already cached, e.g. {already[0]!r}")
            name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
            final = self.dir / SHARD_DIR / name
            write_atomic(final, save(tensors, metadata={"example_ids": json.dumps(list(example_ids))}))
            line = json.dumps({"shard": name, "ids": list(example_ids)}) + "\n"
            with open(self.dir / INDEX_FILE, "a+b") as index:
                index.seek(0, os.SEEK_END)
                if index.tell() > 0:
                    index.seek(-1, os.SEEK_END)
                    if index.read(1) != b"\n":  # a line torn by a crash: start a fresh one after it
                        line = "\n" + line
                index.write(line.encode("utf-8"))
                index.flush()
                os.fsync(index.fileno())
            for row, example_id in enumerate(example_ids):
                self._index[example_id] = (name, row)

    def read_one(self, example_id: str) -> tuple[Tensor, ...]:
        """``(logprobs (T, k) float32, indices (T, k) long, rest_logprob (T,) float32)`` of one example, then (in a
        cache with tail samples) ``tail_indices (T, m) long, tail_logprobs (T, m) float32, tail_stats (T, 2)``."""
        if example_id not in self._index:
            self._reload_index()
            if example_id not in self._index:
                raise KeyError(f"example {example_id!r} is not in the teacher cache {self.dir}")
        shard, row = self._index[example_id]
        handle = self._handle(shard)
        start, stop = (int(x) for x in self._offsets[shard][row : row + 2])
        rows = (
            handle.get_slice("logprobs")[start:stop].float(),
            handle.get_slice("indices")[start:stop].long(),
            handle.get_slice("rest_logprob")[start:stop].float(),
        )
        if not self.tail_samples:
            return rows
        return (*rows, handle.get_slice("tail_indices")[start:stop].long(),
                handle.get_slice("tail_logprobs")[start:stop].float(), handle.get_slice("tail_stats")[start:stop].float())

    def read(
        self, example_ids: Sequence[str], *, length: int | None = None, device: torch.device | str | None = None
    ) -> TopK:
        """A batch :class:`TopK` ``(B, L, k)``, right-aligned like ``continuation_logits``, with ``mask (B, L)``.

        ``L`` = the longest example, or ``length`` when given (it must be at least that). Padding positions hold
        log-prob 0 and id 0 and are False in the mask.
        """
        rows = [self.read_one(example_id) for example_id in example_ids]
        longest = max((row[0].shape[0] for row in rows), default=0)
        width = longest if length is None else length
        if width < longest:
            raise ValueError(f"length={length} is shorter than the longest cached example ({longest} tokens)")
        batch = len(rows)
        logprobs = torch.zeros((batch, width, self.k), dtype=torch.float32)
        indices = torch.zeros((batch, width, self.k), dtype=torch.long)
        rest = torch.zeros((batch, width), dtype=torch.float32)
        mask = torch.zeros((batch, width), dtype=torch.bool)
        m = self.tail_samples
        tail_ids = torch.zeros((batch, width, m), dtype=torch.long) if m else None
        tail_lp = torch.zeros((batch, width, m), dtype=torch.float32) if m else None
        stats = torch.zeros((batch, width, 2), dtype=torch.float32) if m else None
        for i, row in enumerate(rows):
            lp, ids, r = row[:3]
            n = lp.shape[0]
            if n:
                logprobs[i, width - n :], indices[i, width - n :], rest[i, width - n :] = lp, ids, r
                mask[i, width - n :] = True
                if m:
                    tail_ids[i, width - n :], tail_lp[i, width - n :], stats[i, width - n :] = row[3:]
        move = (lambda t: t.to(device) if t is not None else None) if device is not None else (lambda t: t)
        return TopK(move(logprobs), move(indices), move(rest), move(mask), tail_indices=move(tail_ids),
                    tail_logprobs=move(tail_lp), tail_stats=move(stats),
                    tail_temperature=self.meta.get("tail_temperature") if m else None)

    def _handle(self, shard: str) -> Any:
        if shard not in self._shards:
            from safetensors import safe_open

            handle = safe_open(str(self.dir / SHARD_DIR / shard), framework="pt")
            self._offsets[shard] = handle.get_tensor("offsets")
            self._shards[shard] = handle
        return self._shards[shard]

    def _reload_index(self) -> None:
        path = self.dir / INDEX_FILE
        if not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a crash: its shard is unreferenced, its examples get recomputed
            if (self.dir / SHARD_DIR / entry["shard"]).exists():
                for row, example_id in enumerate(entry["ids"]):
                    self._index[example_id] = (entry["shard"], row)

    def _lock(self):
        from filelock import FileLock

        return FileLock(str(self.dir / ".lock"))


def example_seed(example_id: str) -> int:
    """A 63-bit seed from an example id (stable across processes and Python hash seeds)."""
    return int.from_bytes(hashlib.sha256(example_id.encode("utf-8")).digest()[:8], "big") >> 1


def build_teacher_cache(
    teacher_model: Any,
    prompts: Sequence[Any],
    targets: Sequence[str] | Sequence[Sequence[int]],
    example_ids: Sequence[str],
    cache_dir: str | Path,
    k: int = 64,
    batch_size: int = 8,
    *,
    dtype: CacheDType = "float16",
    examples_per_shard: int = 256,
    vocab_size: int | None = None,
    chunk_size: int = 128,
    extra: Mapping[str, Any] | None = None,
    support: Any = None,
    tail_samples: int = 0,
    tail_temperature: float = 1.0,
) -> TeacherCache | None:
    """Run the teacher once over (prompt, target) pairs and store its top-k log-probs per target token.

    ``teacher_model`` is a :class:`~speechlm_eval.models.base.SpeechLM` adapter (its ``continuation_logits`` is run
    under ``no_grad``; log-softmax in float32 over the real vocabulary, padded lm_head rows cut first).
    ``prompts``: :class:`~speechlm_eval.models.base.Prompt` s; ``targets``: strings or token-id lists, as
    ``continuation_logits`` takes them. Examples already cached are skipped (resume); a shard is written every
    ``examples_per_shard`` examples and at the end. ``vocab_size`` defaults to ``len(teacher_model.tokenizer)``;
    with a ``support`` (:class:`~speechlm_eval.distill.vocab.KDSupport`) the top-k is taken over the support and
    its ids are positions in it. ``extra`` is recorded in (and checked against) ``meta.json``, see
    :class:`TeacherCache`.
    Returns the cache, or ``None`` when ``k == 0`` (no cache: full teacher logits on the fly).
    """
    if k == 0:
        return None
    if not len(prompts) == len(targets) == len(example_ids):
        raise ValueError(f"{len(prompts)} prompts, {len(targets)} targets, {len(example_ids)} ids: must be equal")
    if len(set(example_ids)) != len(example_ids):
        raise ValueError("example ids must be unique")
    vocab = vocab_size if vocab_size is not None else real_vocab_size(teacher_model.tokenizer)
    if support is not None:
        vocab = support.size
        extra = {**dict(extra or {}), "support": support.describe()}
    cache = TeacherCache(
        cache_dir, teacher=teacher_fingerprint(teacher_model), k=k, vocab_size=vocab, dtype=dtype, extra=extra,
        tail_samples=tail_samples, tail_temperature=tail_temperature,
    )
    todo = [i for i, example_id in enumerate(example_ids) if example_id not in cache]
    pending_ids: list[str] = []
    pending: list[tuple[Tensor, Tensor, Tensor]] = []
    with stage("teacher cache", total=len(todo), unit="examples", enabled=bool(todo)) as shown:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            with torch.no_grad():
                logits, _, mask = teacher_model.continuation_logits(
                    [prompts[i] for i in batch], [targets[i] for i in batch]
                )
            for row, i in enumerate(batch):
                n = int(mask[row].sum())
                if n == 0:
                    empty = torch.zeros((0, k))
                    if tail_samples:
                        none = torch.zeros((0, tail_samples))
                        pending.append(TopK(empty, empty.long(), torch.zeros(0), tail_indices=none.long(),
                                            tail_logprobs=none, tail_stats=torch.zeros((0, 2)),
                                            tail_temperature=tail_temperature))
                    else:
                        pending.append((empty, empty.long(), torch.zeros(0)))
                else:
                    # (n, V): right-aligned real tokens, over the KD support (the teacher's real vocabulary by default)
                    tokens = support.teacher_logits(logits[row, -n:]) if support is not None \
                        else cut_padded_vocab(logits[row, -n:], vocab)
                    # Tail draws seeded by the example, so a resumed or re-batched build draws the same ids.
                    generator = torch.Generator(device=tokens.device).manual_seed(example_seed(example_ids[i]))
                    top = topk_from_logits(tokens, k, chunk_size, tail_samples=tail_samples,
                                           tail_temperature=tail_temperature, generator=generator)
                    pending.append(top if tail_samples else (top.logprobs, top.indices, top.rest_logprob))
                pending_ids.append(example_ids[i])
            del logits
            shown.advance(len(batch))
            if len(pending_ids) >= examples_per_shard:
                cache.write(pending_ids, pending)
                pending_ids, pending = [], []
        cache.write(pending_ids, pending)
    return cache
