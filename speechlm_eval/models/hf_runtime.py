"""Shared machinery for transformers decoder-only models: device/dtype choice, padded batches, generation, log-probs.

Family files (``qwen2_audio.py``, ``hf_causal.py``) only turn prompts into chat-formatted model inputs; everything
that is the same for every decoder-only model lives here once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import Generation, GenerationConfig

def resolve_device(device: str) -> torch.device:
    """"auto" = this process's device under accelerate/torchrun, else CUDA when present, else CPU."""
    if device != "auto":
        return torch.device(device)
    from speechlm_eval.distributed import process_state

    return process_state().device


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """"auto" = the checkpoint's own dtype on an accelerator, float32 on CPU (bf16 matmuls are slow on CPUs)."""
    if dtype == "auto":
        return "auto" if device.type != "cpu" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def checkpoint_identity(name_or_path: str, model: torch.nn.Module, revision: str | None) -> dict[str, Any]:
    """Id, requested revision, resolved hub commit (when downloaded) and a cheap local fingerprint."""
    identity: dict[str, Any] = {
        "id": name_or_path,
        "revision": revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        # Hash of config + weight-file names and sizes: identifies a local checkpoint without reading GBs.
        digest = hashlib.sha256()
        for file in sorted(path.iterdir()):
            if file.name == "config.json":
                digest.update(file.read_bytes())
            elif file.suffix in {".safetensors", ".bin"}:
                digest.update(f"{file.name}:{file.stat().st_size}".encode())
        identity["fingerprint"] = digest.hexdigest()[:16]
    return identity


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists. Returns ``input_ids`` and ``attention_mask``, both ``(batch, max_len)`` int64."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row):] = 1
    return ids, mask


def unpadded_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
    """The real tokens of each row of a padded batch, shape ``(batch, len)`` → list of id lists."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)]


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    inputs: Mapping[str, torch.Tensor],
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
) -> list[Generation]:
    """Run ``model.generate`` on left-padded ``inputs`` and decode only the new tokens (VoiceBench's decoding)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample}
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)
        torch.manual_seed(config.seed)
    else:
        # Explicit, so a checkpoint's generation_config (which may ask for sampling) cannot change greedy decoding.
        kwargs.update(temperature=None, top_p=None, top_k=None)
    output = model.generate(
        **inputs, **kwargs, eos_token_id=list(eos_token_ids), pad_token_id=tokenizer.pad_token_id
    )
    prompt_width = inputs["input_ids"].shape[1]
    n_prompt = inputs["attention_mask"].sum(dim=1).tolist()
    results = []
    for row, n in zip(output[:, prompt_width:], n_prompt):
        tokens = row.tolist()
        hit_eos = next((i for i, t in enumerate(tokens) if t in eos_token_ids), None)
        kept = tokens if hit_eos is None else tokens[: hit_eos + 1]
        while kept and kept[-1] == tokenizer.pad_token_id and kept[-1] not in eos_token_ids:
            kept.pop()
        text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        results.append(
            Generation(
                text=text,
                n_prompt_tokens=int(n),
                n_new_tokens=len(kept),
                finish_reason="eos" if hit_eos is not None else "length",
            )
        )
    return results


def continuation_logits(
    model: torch.nn.Module,
    tokenizer: Any,
    inputs: Mapping[str, torch.Tensor],
    continuations: Sequence[str] | Sequence[Sequence[int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token logits at each continuation token, teacher-forced after its (left-padded) prompt.

    ``inputs`` holds the prompts (``input_ids``/``attention_mask`` ``(batch, len)`` plus any family extras such as
    audio features, passed through unchanged); ``continuations`` are strings or token id lists. Differentiable: call
    under ``torch.no_grad()`` when no gradient is wanted.

    Returns ``(logits, targets, mask)``: ``logits`` ``(batch, longest, vocab)`` in the model's dtype, where position
    ``t`` holds the distribution that predicts ``targets[:, t]``; continuations are right-aligned, so a shorter one
    occupies the last positions and ``mask`` ``(batch, longest)`` (bool) marks its real tokens.
    """
    cont_ids = [
        list(c) if not isinstance(c, str) else tokenizer(c, add_special_tokens=False)["input_ids"]
        for c in continuations
    ]
    rows = [p + c for p, c in zip(unpadded_rows(inputs["input_ids"], inputs["attention_mask"]), cont_ids)]
    input_ids, attention_mask = left_pad(rows, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    batch.update(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    longest = max((len(c) for c in cont_ids), default=0)
    mask = torch.zeros((len(cont_ids), longest), dtype=torch.bool, device=device)
    for i, c in enumerate(cont_ids):
        if c:
            mask[i, longest - len(c):] = True
    if longest == 0:
        return torch.zeros((len(cont_ids), 0, 0), device=device), input_ids[:, :0].to(device), mask
    # Only the positions that predict continuation tokens are needed; models that ignore ``logits_to_keep``
    # (Qwen2-Audio) return every position, hence the slice.
    logits = model(**batch, logits_to_keep=longest + 1).logits[:, -(longest + 1) : -1]
    return logits, input_ids[:, -longest:].to(device), mask


@torch.inference_mode()
def continuation_logprobs_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    inputs: Mapping[str, torch.Tensor],
    continuations: Sequence[str],
) -> list[np.ndarray]:
    """Log-probs of each continuation's tokens appended to its prompt: float32 arrays of shape ``(n_tokens,)``."""
    logits, targets, mask = continuation_logits(model, tokenizer, inputs, continuations)
    if logits.shape[1] == 0:
        return [np.zeros(0, dtype=np.float32) for _ in continuations]
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return [picked[i][mask[i]].cpu().numpy().astype(np.float32) for i in range(len(continuations))]


def check_clip(audio: np.ndarray | None, *, max_seconds: float | None, n_audio_tokens: int, min_tokens: int,
               sampling_rate: int = SAMPLING_RATE) -> None:
    """Refuse a clip the feature extractor would silently truncate to the encoder window, or one too short to encode.

    ``n_audio_tokens``: what the family's encoder emits for this clip; ``min_tokens``: the fewest it can take.
    """
    from speechlm_eval.models.base import ModelInputError

    if audio is None:
        return
    seconds = len(audio) / sampling_rate
    if n_audio_tokens < min_tokens:
        raise ModelInputError(f"audio is {seconds:.3f} s long, too short to encode "
                              f"({n_audio_tokens} audio token(s), at least {min_tokens} needed)")
    if max_seconds is not None and seconds > max_seconds + 1e-9:
        raise ModelInputError(f"audio is {seconds:.2f} s long but the audio encoder window is {max_seconds:.0f} s; "
                              "the feature extractor would silently truncate it")


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """Ids that end an answer: the checkpoint's generation EOS ids plus ChatML's ``<|im_end|>`` when it exists."""
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end not in ids and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    if not ids:
        ids = [tokenizer.eos_token_id]
    return [int(i) for i in ids]


class HFAdapter:
    """What every transformers-backed family shares once it can ``encode`` prompts into padded model inputs.

    A family class sets ``family``, ``name``, ``model``, ``tokenizer``, ``revision`` and ``_eos_ids`` and defines
    ``encode(prompts)``; generation, log-probs, logits and the manifest identity come from here.
    """

    family: str
    name: str
    model: torch.nn.Module
    tokenizer: Any
    revision: str | None
    _eos_ids: list[int]

    def encode(self, prompts: Sequence[Any]) -> Mapping[str, torch.Tensor]:  # pragma: no cover - per family
        raise NotImplementedError

    def generate(self, prompts: Sequence[Any], config: GenerationConfig) -> list[Generation]:
        return generate_batch(self.model, self.tokenizer, self.encode(prompts), config, self._eos_ids)

    def continuation_logprobs(self, prompts: Sequence[Any], continuations: Sequence[str]) -> list[np.ndarray]:
        return continuation_logprobs_batch(self.model, self.tokenizer, self.encode(prompts), continuations)

    def continuation_logits(self, prompts: Sequence[Any], continuations: Sequence[str] | Sequence[Sequence[int]]):
        """Teacher-forced next-token logits over each continuation (see :func:`continuation_logits`)."""
        return continuation_logits(self.model, self.tokenizer, self.encode(prompts), continuations)

    def describe_with(self, **extra: Any) -> dict[str, Any]:
        """The manifest identity: family, id/revision/commit/fingerprint, dtype, device, plus family extras."""
        param = next(self.model.parameters())
        return {
            "family": self.family,
            **checkpoint_identity(self.name, self.model, self.revision),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            **extra,
        }
