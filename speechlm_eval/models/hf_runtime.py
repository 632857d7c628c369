"""Shared machinery for transformers decoder-only models: device/dtype choice, padded batches, generation, log-probs.

Family files (``qwen2_audio.py``, ``hf_causal.py``) only turn prompts into chat-formatted model inputs; everything
that is the same for every decoder-only model lives here once.
"""

from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.base import CHECKPOINT_DEFAULTS, Generation, GenerationConfig

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


def attention_kwargs(options: Any) -> dict[str, str]:
    """``from_pretrained`` keyword for the attention kernel the options ask for (none: transformers' default)."""
    chosen = getattr(options, "attn_implementation", None)
    return {"attn_implementation": chosen} if chosen else {}


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


def effective_generation_config(config: GenerationConfig, eos_token_ids: Sequence[int], pad_token_id: int | None):
    """The transformers ``GenerationConfig`` a generate call runs with: exactly ``config`` (greedy unless it samples),
    the end-of-answer and padding ids, and ``config.extra``; nothing from the checkpoint's own generation config."""
    from transformers import GenerationConfig as TransformersGenerationConfig

    kwargs: dict[str, Any] = {"max_new_tokens": config.max_new_tokens, "do_sample": config.do_sample,
                              "eos_token_id": list(eos_token_ids), "pad_token_id": pad_token_id}
    if config.do_sample:
        kwargs.update(temperature=config.temperature, top_p=config.top_p)
    kwargs.update({k: v for k, v in config.extra if k != CHECKPOINT_DEFAULTS})
    if "max_length" in kwargs:
        kwargs.pop("max_new_tokens")  # a total-length cap (VoiceBench's) replaces the new-token budget
    return TransformersGenerationConfig(**kwargs)


@contextlib.contextmanager
def only_token_ids_from_checkpoint(model: torch.nn.Module) -> Iterator[None]:
    """Within the block the model's own generation config holds only its special token ids.

    transformers fills every generation setting the caller leaves unset from ``model.generation_config`` (the
    checkpoint's ``generation_config.json``), so a leftover ``repetition_penalty: 1.5`` would silently apply to a
    "greedy" run; blanking it keeps decoding to what :func:`effective_generation_config` says.
    """
    from transformers import GenerationConfig as TransformersGenerationConfig

    original = model.generation_config
    keep = {k: getattr(original, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                      "decoder_start_token_id")}
    model.generation_config = TransformersGenerationConfig(**{k: v for k, v in keep.items() if v is not None})
    try:
        yield
    finally:
        model.generation_config = original


def pool_prompt(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Hidden states of a left-padded prompt batch ``(B, T, H)`` with ``attention_mask (B, T)`` → ``(B, H)``: the last
    position (left padding puts every prompt's end there) or the mean over its real positions."""
    if pool == "last":
        return hidden[:, -1]
    if pool != "mean":
        raise ValueError(f"unknown pooling {pool!r}; choose last or mean")
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)


@torch.inference_mode()
def generate_batch(
    model: torch.nn.Module,
    tokenizer: Any,
    inputs: Mapping[str, torch.Tensor],
    config: GenerationConfig,
    eos_token_ids: Sequence[int],
    *,
    cache: Any = None,
    budgets: Sequence[int] | None = None,
    keep_cache: bool = False,
) -> Any:
    """Run ``model.generate`` on left-padded ``inputs`` and decode only the new tokens (VoiceBench's decoding).

    ``cache``: a key/value cache already filled for the first columns of ``inputs`` (generation continues from it;
    :mod:`~.prompt_cache`); ``budgets``: each row's own new-token limit, applied when decoding; ``keep_cache``: also
    return the cache ``generate`` filled, as ``(generations, cache)``.
    """
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if config.do_sample:
        torch.manual_seed(config.seed)
    generation = effective_generation_config(config, eos_token_ids, tokenizer.pad_token_id)
    generation.return_dict_in_generate = True
    keep_checkpoint = dict(config.extra).get(CHECKPOINT_DEFAULTS, False)
    extra = {} if cache is None else {"cache": cache}
    # The prefill needs the next-token logits of the last position only; families whose forward ignores
    # ``logits_to_keep`` (Qwen2-Audio, the Omni thinkers) would project every prompt position (at a 152k-156k
    # vocabulary: gigabytes for a batch of long audio prompts, and the memory the auto batch trial does not count).
    with contextlib.nullcontext() if keep_checkpoint else only_token_ids_from_checkpoint(model), \
            head_on_last_positions(model, 1):
        output = model.generate(**inputs, **extra, generation_config=generation)
    generations = decode_generations(output.sequences, inputs["input_ids"].shape[1],
                                     inputs["attention_mask"].sum(dim=1).tolist(), tokenizer, eos_token_ids,
                                     budgets=budgets)
    return (generations, output.cache) if keep_cache else generations


def decode_generations(sequences: torch.Tensor, prompt_width: int, n_prompt: Sequence[int], tokenizer: Any,
                       eos_token_ids: Sequence[int], budgets: Sequence[int] | None = None) -> list[Generation]:
    """The new tokens of ``generate``'s ``sequences`` ``(batch, prompt_width + new)``, decoded (VoiceBench's decoding:
    special tokens skipped), each cut after its first end-of-sequence token and, when ``budgets`` is given, to its
    row's own budget first."""
    results = []
    for k, (row, n) in enumerate(zip(sequences[:, prompt_width:], n_prompt)):
        tokens = row.tolist()
        if budgets is not None:
            tokens = tokens[: int(budgets[k])]
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
    # Only the positions that predict continuation tokens are needed: the head projects just those (models that
    # ignore ``logits_to_keep``, Qwen2-Audio and the Omni thinkers, would otherwise build logits for every position:
    # at a 152k vocabulary that, not the model, is the memory peak of a long prompt).
    with head_on_last_positions(model, longest + 1):
        logits = model(**batch, logits_to_keep=longest + 1).logits[:, -(longest + 1) : -1]
    return logits, input_ids[:, -longest:].to(device), mask


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The vocabulary projection of a (possibly DDP- or PEFT-wrapped) model, ``None`` when it has none."""
    inner = model
    for _ in range(4):  # DistributedDataParallel -> PeftModel -> LoraModel -> the transformers model
        if hasattr(inner, "get_output_embeddings"):
            try:
                head = inner.get_output_embeddings()
            except (AttributeError, NotImplementedError):
                head = None
            if isinstance(head, torch.nn.Module):
                return head
        inner = getattr(inner, "module", None) or getattr(inner, "base_model", None) or getattr(inner, "model", None)
        if inner is None:
            break
    return None


@contextlib.contextmanager
def head_on_last_positions(model: torch.nn.Module, keep: int) -> Iterator[None]:
    """Within the block the output head sees only the last ``keep`` positions of its input ``(batch, len, hidden)``
    (a forward pre-hook: the same head, weights and autograd graph, on fewer rows)."""
    head = output_head(model)
    if head is None:
        yield
        return

    def last_positions(_module: torch.nn.Module, args: tuple) -> tuple:
        hidden, *rest = args
        return (hidden[:, -keep:], *rest) if hidden.dim() == 3 and hidden.shape[1] > keep else args

    handle = head.register_forward_pre_hook(last_positions)
    try:
        yield
    finally:
        handle.remove()


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
    im_end = tokenizer.get_vocab().get("<|im_end|>")  # not convert_tokens_to_ids: Mistral's tokenizer warns on a miss
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

    reuses_prompt_cache: bool = False  # a family whose prompt cache can be continued (:mod:`.prompt_cache`)

    def generate_keeping_prompt(self, prompts: Sequence[Any], config: GenerationConfig) -> tuple[list[Generation], Any]:
        """:meth:`generate`, plus the prompts' :class:`~.prompt_cache.PromptState` to run more tokens after them;
        only for a family with ``reuses_prompt_cache``."""
        if not self.reuses_prompt_cache:
            raise NotImplementedError(f"{self.family}: its prompt cache is not reused")
        from speechlm_eval.models.prompt_cache import generate_keeping_prompt

        chat_ids = getattr(self, "chat_token_ids", None)
        config_of = getattr(self.model, "config", None)
        audio_ids = frozenset(int(getattr(config_of, name)) for name in ("audio_token_id", "audio_token_index")
                              if isinstance(getattr(config_of, name, None), int))
        return generate_keeping_prompt(self.model, self.tokenizer, self.encode(prompts), config, self._eos_ids,
                                       self.encode, prompts, chat_ids, audio_ids)

    def default_system_prompt(self) -> str | None:
        """The system text this model's prompts carry when none is given (its chat template's default, or the one
        its family sends), read off two renderings: with a marker system turn and with none."""
        from speechlm_eval.models.base import Prompt

        user, system = "\x00user-marker\x00", "\x00system-marker\x00"
        plain = self.chat_text(Prompt(text=user))  # type: ignore[attr-defined]
        marked = self.chat_text(Prompt(text=user, system=system))  # type: ignore[attr-defined]
        head, found, tail = marked.partition(system)
        if not found or not plain.startswith(head):
            return None
        between = tail.partition(user)[0]  # the template's text from the end of the system turn to the user text
        rest = plain[len(head):]
        end = rest.find(between + user)
        return rest[:end] if end > 0 else None

    def generation_settings(self, config: GenerationConfig) -> dict[str, Any]:
        """What a generate call with ``config`` really runs with (for the manifest): the settings that differ from
        transformers' defaults, plus whether the checkpoint's own generation config fills the rest."""
        settings = effective_generation_config(config, self._eos_ids, self.tokenizer.pad_token_id).to_diff_dict()
        settings.pop("transformers_version", None)
        settings["checkpoint_defaults"] = dict(config.extra).get(CHECKPOINT_DEFAULTS, False)
        if settings["checkpoint_defaults"]:
            settings["checkpoint_generation_config"] = self.model.generation_config.to_diff_dict()
        return settings

    def continuation_logprobs(self, prompts: Sequence[Any], continuations: Sequence[str]) -> list[np.ndarray]:
        return continuation_logprobs_batch(self.model, self.tokenizer, self.encode(prompts), continuations)

    def continuation_logits(self, prompts: Sequence[Any], continuations: Sequence[str] | Sequence[Sequence[int]]):
        """Teacher-forced next-token logits over each continuation (see :func:`continuation_logits`)."""
        return continuation_logits(self.model, self.tokenizer, self.encode(prompts), continuations)

    def prompt_hidden_states(self, prompts: Sequence[Any], layers: Sequence[int], pool: str = "last") -> torch.Tensor:
        """The language model's hidden states after each of ``layers`` (0 = embeddings, -1 = the last layer),
        pooled over each prompt (:func:`pool_prompt`): ``(batch, len(layers), hidden)``, differentiable (call under
        ``torch.no_grad()`` for a target)."""
        inputs = self.encode(prompts)
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in inputs.items()}
        with head_on_last_positions(self.model, 1):  # the logits are not needed: project one position only
            out = self.model(**batch, output_hidden_states=True, logits_to_keep=1)
        states = out.hidden_states
        return torch.stack([pool_prompt(states[layer], batch["attention_mask"], pool) for layer in layers], 1)

    def describe_with(self, **extra: Any) -> dict[str, Any]:
        """The manifest identity: family, id/revision/commit/fingerprint, dtype, device, plus family extras."""
        param = next(self.model.parameters())
        return {
            "family": self.family,
            **checkpoint_identity(self.name, self.model, self.revision),
            "dtype": str(param.dtype).removeprefix("torch."),
            "device": str(param.device),
            "attn_implementation": getattr(getattr(self.model, "config", None), "_attn_implementation", None),
            **extra,
        }
