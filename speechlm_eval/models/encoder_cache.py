"""An audio encoder's outputs, cached per clip: across steps and epochs of a distillation run, and across the arms
and diagnostics of one ``gap`` run.

The encoder is in eval mode and its weights do not change while the cache is installed, so a clip's log-mel
features always encode to the same outputs; without a cache every epoch of a distillation (and every audio channel of
a step: ``st``, ``st_prefix``, ``st_self``, ``st_hidden``) re-encodes the same clips, and every clip of a ``gap`` run
is encoded three times (the speech arm, the KL/JSD pass, the perception probe). :class:`EncoderCache` wraps the
encoder's ``forward``: each input row (one clip, or one encoder window, whatever the family feeds it) is keyed by the
bytes of its features and mask, its outputs are kept on CPU, and only rows not seen before are encoded, as one
sub-batch. A row's outputs do not depend on its batch-mates (the encoder attends within a row); whether they are the
same bits in another batch is the kernels' affair: on CPU they are (tested on Qwen2-Audio's encoder, and ``gap``'s
records are byte-identical with and without the cache), elsewhere a row encoded in another batch may round
differently, so cached and uncached runs agree to float tolerance. A call whose inputs or outputs are not row-wise
tensors (an encoder that flattens clips into one sequence) runs uncached.

:class:`FeatureCache` does the same one step earlier for ``gap``: it stands in for the processor's feature extractor
and extracts the log-mel features of clips not seen before only (keyed by the bytes of their samples), for calls that
pad every clip to the fixed window. :func:`cached_audio_encoder` installs both around a model.

Memory is bounded in bytes (``max_bytes``): rows are admitted until the bound is reached and kept, later rows are
encoded every time. Both users read their clips in repeated passes in nearly the same order (epochs; the arm, the KL
pass and the probe, each longest clip first), for which keeping what fits beats least-recently-used eviction: an LRU
smaller than one pass evicts every row before its next use and never hits.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch


@dataclass
class CacheStats:
    """What the cache did: rows served from it, rows encoded, calls it could not split by row, bytes it holds."""

    hits: int = 0
    misses: int = 0
    uncached_calls: int = 0
    stored_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "uncached_calls": self.uncached_calls,
                "stored_bytes": self.stored_bytes}


class EncoderCache:
    """Per-row outputs of an ``encoder`` (a ``torch.nn.Module`` whose ``forward`` takes tensors with a leading
    batch dimension ``B``, e.g. log-mel features ``(B, mel_bins, frames)`` and a mask ``(B, ...)``, and returns a
    tensor, tuple or ``ModelOutput`` of tensors ``(B, ...)``), held on CPU up to ``max_bytes``.

    ``frozen_only`` (distillation): refuse an encoder with trainable weights, whose outputs change every step. Off
    (evaluation, where nothing trains but the weights keep ``requires_grad``): calls run uncached whenever autograd
    would record them (grad enabled and the weights or inputs need grad), so only ``no_grad`` calls are cached.
    """

    def __init__(self, encoder: torch.nn.Module, max_bytes: int, *, frozen_only: bool = True) -> None:
        self.trainable = any(p.requires_grad for p in encoder.parameters())
        if frozen_only and self.trainable:
            raise ValueError("the audio encoder is trained: its outputs change every step and cannot be cached")
        self.encoder = encoder
        self.max_bytes = max_bytes
        self.rows: dict[str, dict[str, torch.Tensor]] = {}
        self.output_type: type | None = None  # the encoder's output class, from the first call it encoded
        self.stats = CacheStats()
        self.features: FeatureCache | None = None  # gap's feature extractor cache beside it (cached_audio_encoder)

    @contextlib.contextmanager
    def installed(self) -> Iterator["EncoderCache"]:
        """Within the block, calls to the encoder go through the cache (its own ``forward`` is restored after)."""
        own = vars(self.encoder).get("forward")  # a forward set on the instance already (accelerate's hooks)
        original = self.encoder.forward
        self.encoder.forward = self._wrap(original)  # an instance attribute: nn.Module.__call__ calls it
        try:
            yield self
        finally:
            if own is not None:
                self.encoder.forward = own
            else:
                del self.encoder.forward

    def _wrap(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        def cached_forward(*args: Any, **kwargs: Any) -> Any:
            if self.encoder.training or torch.is_grad_enabled() and (self.trainable or _needs_grad(args, kwargs)):
                self.stats.uncached_calls += 1
                return forward(*args, **kwargs)
            return self._forward(forward, args, kwargs)

        return cached_forward

    def _forward(self, forward: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
        batch = _batch_size(args, kwargs)
        if batch is None:
            self.stats.uncached_calls += 1
            return forward(*args, **kwargs)
        keys = [_row_key(args, kwargs, i) for i in range(batch)]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        fresh: dict[int, dict[str, torch.Tensor]] = {}
        if missing:
            output = forward(*_rows(args, missing), **_rows(kwargs, missing))
            fields = _fields(output, len(missing))
            if fields is None:  # not row-wise: encode the whole call as it came
                self.stats.uncached_calls += 1
                return forward(*args, **kwargs) if len(missing) < batch else output
            self.output_type = type(output)
            for j, i in enumerate(missing):
                fresh[i] = {name: value[j : j + 1] for name, value in fields.items()}
                self._store(keys[i], fresh[i])
        self.stats.hits += batch - len(missing)
        self.stats.misses += len(missing)
        device = _device(args, kwargs)
        rows = [fresh[i] if i in fresh else {n: t.to(device) for n, t in self.rows[keys[i]].items()}
                for i in range(batch)]
        joined = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
        return _rebuild(self.output_type, joined)

    def _store(self, key: str, row: dict[str, torch.Tensor]) -> None:
        size = sum(t.numel() * t.element_size() for t in row.values())
        if self.stats.stored_bytes + size > self.max_bytes:
            return  # full: later rows are encoded every time
        self.rows[key] = {name: t.detach().to("cpu", copy=True) for name, t in row.items()}
        self.stats.stored_bytes += size


class FeatureCache:
    """Per-clip outputs of a processor's feature extractor (log-mel features and their mask), keyed by the bytes of
    the clip's samples and the call's options, held on CPU up to ``max_bytes``; a proxy that stands in for
    ``processor.feature_extractor`` (every other attribute is the extractor's own).

    Only calls that pad every clip to the extractor's fixed window (``padding="max_length"``, what Qwen2-Audio's
    processor asks for) are cached: there a clip's features do not depend on its batch-mates. Any other call (padding
    to the longest clip of the batch, inputs that are not a list of 1-D arrays, outputs that are not row-wise) runs as
    it came."""

    def __init__(self, extractor: Any, max_bytes: int) -> None:
        self.extractor = extractor
        self.__wrapped__ = extractor  # ``inspect.signature(proxy)`` reads the extractor's own call defaults
        self.max_bytes = max_bytes
        self.rows: dict[str, dict[str, Any]] = {}
        self.output_type: type | None = None
        self.stats = CacheStats()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.extractor, name)

    def __call__(self, audio: Any, *args: Any, **kwargs: Any) -> Any:
        clips = list(audio) if isinstance(audio, (list, tuple)) else None
        if (args or kwargs.get("padding") != "max_length" or not clips
                or not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in clips)):
            self.stats.uncached_calls += 1
            return self.extractor(audio, *args, **kwargs)
        options = repr(sorted((k, repr(v)) for k, v in kwargs.items())).encode()
        keys = [_clip_key(clip, options) for clip in clips]
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        fresh: dict[int, dict[str, Any]] = {}
        if missing:
            output = self.extractor([clips[i] for i in missing], **kwargs)
            fields = _array_fields(output, len(missing))
            if fields is None:
                self.stats.uncached_calls += 1
                return self.extractor(audio, **kwargs) if len(missing) < len(clips) else output
            self.output_type = type(output)
            for j, i in enumerate(missing):
                fresh[i] = {name: value[j : j + 1] for name, value in fields.items()}
                self._store(keys[i], fresh[i])
        self.stats.hits += len(clips) - len(missing)
        self.stats.misses += len(missing)
        rows = [fresh.get(i) or self.rows[keys[i]] for i in range(len(clips))]
        joined = {name: (torch.cat if isinstance(rows[0][name], torch.Tensor) else np.concatenate)(
            [row[name] for row in rows]) for name in rows[0]}
        assert self.output_type is not None  # set by the call that stored the rows
        return self.output_type(joined)

    @contextlib.contextmanager
    def installed(self, processor: Any) -> Iterator[bool]:
        """Within the block ``processor.feature_extractor`` is this cache; yields whether it could be put there (not
        on a processor that is a frozen record, as the Omni families' own are: their features run uncached)."""
        own = processor.feature_extractor
        try:
            processor.feature_extractor = self
        except AttributeError:
            yield False
            return
        try:
            yield True
        finally:
            processor.feature_extractor = own

    def _store(self, key: str, row: dict[str, Any]) -> None:
        size = sum(v.nbytes for v in row.values())
        if self.stats.stored_bytes + size > self.max_bytes:
            return
        self.rows[key] = {name: v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v.copy()
                          for name, v in row.items()}
        self.stats.stored_bytes += size


@contextlib.contextmanager
def cached_audio_encoder(model: Any, max_bytes: int) -> Iterator[EncoderCache | None]:
    """Within the block, ``model``'s audio encoder (``model.audio_encoder()``, the
    :class:`~speechlm_eval.models.base.TrainableSpeechLM` interface) goes through an :class:`EncoderCache`, caching
    its ``no_grad`` calls, and its processor's feature extractor through a :class:`FeatureCache` (where the model has
    one), each holding at most half of ``max_bytes``. Yields the encoder cache (its ``features`` attribute: the
    feature cache or ``None``), or ``None`` (and changes nothing) where it cannot apply: no bytes, a model without an
    audio encoder (a text LLM, a served model), an encoder in training mode."""
    cache = None
    finder = getattr(model, "audio_encoder", None)
    if max_bytes > 0 and callable(finder):
        try:
            encoder = finder()
        except Exception:  # noqa: BLE001 - a family whose encoder cannot be found is simply not cached
            encoder = None
        if isinstance(encoder, torch.nn.Module) and not encoder.training:
            cache = EncoderCache(encoder, max_bytes // 2, frozen_only=False)
    if cache is None:
        yield None
        return
    processor = getattr(model, "processor", None)
    extractor = getattr(processor, "feature_extractor", None)
    features = FeatureCache(extractor, max_bytes // 2) if extractor is not None else None
    with contextlib.ExitStack() as stack:
        cache.features = features if features is not None and stack.enter_context(features.installed(processor)) \
            else None
        stack.enter_context(cache.installed())
        yield cache


def _clip_key(clip: np.ndarray, options: bytes) -> str:
    digest = hashlib.blake2b(options, digest_size=20)
    digest.update(f"{clip.dtype}{clip.shape}".encode())
    digest.update(np.ascontiguousarray(clip).view(np.uint8).tobytes())
    return digest.hexdigest()


def _array_fields(output: Any, batch: int) -> dict[str, Any] | None:
    """A feature extractor's output (a ``BatchFeature``) by field, ``None`` unless every field is a tensor or array
    with leading dimension ``batch``."""
    if not (hasattr(output, "keys") and hasattr(output, "__getitem__")):
        return None
    items = {k: output[k] for k in output.keys()}
    if not items or not all(isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim > 0 and v.shape[0] == batch
                            for v in items.values()):
        return None
    return items


def _tensors(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    return [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


def _needs_grad(args: tuple, kwargs: dict[str, Any]) -> bool:
    return any(t.requires_grad for t in _tensors(args, kwargs))


def _batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The common leading dimension of every tensor argument, ``None`` when they disagree or there is none."""
    sizes = {t.shape[0] for t in _tensors(args, kwargs) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 and all(t.dim() > 0 for t in _tensors(args, kwargs)) else None


def _row_key(args: tuple, kwargs: dict[str, Any], i: int) -> str:
    """A digest of row ``i`` of every tensor argument (dtype, shape, bytes) and of the other arguments' values."""
    digest = hashlib.blake2b(digest_size=20)
    for name, value in [*enumerate(args), *sorted(kwargs.items())]:
        digest.update(str(name).encode())
        if isinstance(value, torch.Tensor):
            row = value[i].detach().contiguous().cpu()
            digest.update(f"{row.dtype}{tuple(row.shape)}".encode())
            digest.update(row.view(torch.uint8).numpy().tobytes() if row.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _rows(values: Any, rows: list[int]) -> Any:
    """``values`` (a tuple of arguments or a dict of keyword arguments) with each tensor cut to ``rows``."""
    index = None

    def cut(v: Any) -> Any:
        nonlocal index
        if not isinstance(v, torch.Tensor):
            return v
        index = index if index is not None and index.device == v.device else torch.tensor(rows, device=v.device)
        return v.index_select(0, index)

    if isinstance(values, dict):
        return {k: cut(v) for k, v in values.items()}
    return tuple(cut(v) for v in values)


def _fields(output: Any, batch: int) -> dict[str, torch.Tensor] | None:
    """The output's tensors by field name (a ``ModelOutput``'s keys, a tuple's positions), ``None`` unless every
    field is a tensor with leading dimension ``batch``."""
    if isinstance(output, torch.Tensor):
        items = {"": output}
    elif hasattr(output, "keys") and hasattr(output, "__getitem__"):
        items = {k: output[k] for k in output.keys()}
    elif isinstance(output, tuple):
        items = {str(i): v for i, v in enumerate(output)}
    else:
        return None
    if not items or not all(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == batch
                            for v in items.values()):
        return None
    return items


def _rebuild(output_type: type | None, fields: dict[str, torch.Tensor]) -> Any:
    """An output of the encoder's own type (``output_type``: a tensor, a tuple or a ``ModelOutput`` class) holding
    ``fields``."""
    if set(fields) == {""}:
        return fields[""]
    if all(name.isdigit() for name in fields):
        return tuple(fields[str(i)] for i in range(len(fields)))
    assert output_type is not None  # a ModelOutput's fields were stored by a call that encoded, which set it
    return output_type(**fields)


def _device(args: tuple, kwargs: dict[str, Any]) -> torch.device:
    tensors = _tensors(args, kwargs)
    return tensors[0].device if tensors else torch.device("cpu")
