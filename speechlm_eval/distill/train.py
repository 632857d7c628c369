"""Cross-modal knowledge distillation (Wang et al. 2025): a text LLM teacher, a speech LLM student, two channels.

T→T: the student *reads* the query, S→T: the student *hears* it (TTS); in both the teacher reads the text, and the
student's next-token distributions over the response are pulled to the teacher's. One readable recipe: the training
loop is :func:`distill`, top to bottom; the helpers below it are small and single-purpose.

Every default the paper does not state is *our reading*: :data:`OUR_READING` lists the plain defaults, and
:func:`our_reading_for` what a run actually used (written to its manifest and report).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from speechlm_eval.distill.alignment import hidden_alignment_loss, prefix_kl, self_distillation_kl
from speechlm_eval.distill.config import (
    _RESUMABLE_CHANGES,
    AUDIO_CHANNELS,
    KD_CHANNELS,
    MANIFEST_SCHEMA,
    our_reading_for,
    ConfigError,
    DistillConfig,
    resolve_distill_config,
)
from speechlm_eval.distill.data import (
    DistillExample,
    attach_audio,
    check_no_leakage,
    filter_speakable,
    load_distill_data,
    speech_prompt,
    synthesize_questions,
    teacher_targets,
    text_prompt,
    write_examples,
)
from speechlm_eval.distill.losses import TopK, ce_loss, kd_loss
from speechlm_eval.distill.teacher_cache import TeacherCache, build_teacher_cache
from speechlm_eval.distributed import set_threads
from speechlm_eval.models.base import TrainableSpeechLM
from speechlm_eval.distill.vocab import KDSupport, kd_support
from speechlm_eval.progress import stage

def distill(config: DistillConfig, *, eval_items: Sequence[Any] | None = None) -> Path:
    """Run (or resume) a distillation; returns ``OUT/checkpoint`` (the merged student + processor).

    When ``stop_after_steps`` ends the run early, the last train state directory is returned instead.
    ``eval_items`` (:class:`~speechlm_eval.data.item.Item` s) are checked for leakage besides ``leakage_suite``.
    """
    from accelerate.utils import set_seed
    from transformers import get_cosine_schedule_with_warmup

    started = time.time()
    config = resolve_distill_config(config)
    accelerator = make_accelerator()
    out = config.out
    channels = config.active_channels()
    prepare_out_dir(config, accelerator)
    set_seed(config.seed)

    # -- Models: the student (speech LLM) and, only where needed, the teacher (text LLM). ------------------------
    student = load_student(config, accelerator)
    student_identity = student.describe()  # before wrapping: the manifest names the checkpoint distilled from
    set_threads(config.threads, accelerator.device, student_identity.get("parameters") or 0)
    teacher_tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)
    # The ids KD compares: the teacher's whole vocabulary when the student only adds tokens after it (audio
    # placeholders), else the token strings both share (ids that mean different things are masked out).
    support = kd_support(teacher_tokenizer, student.tokenizer)
    teacher = None

    # -- Data: read, keep what can be spoken, speak it, pick the targets (main process first; others read its files).
    tts = make_tts(config)
    if accelerator.is_main_process and not (out / "data" / "examples.jsonl").exists():
        if config.targets == "teacher":
            teacher = load_teacher(config, accelerator)
        prepare_data(config, student, teacher, tts, eval_items)
    accelerator.wait_for_everyone()
    examples, data_counts = read_prepared(out)
    target_ids = {e.id: response_ids(student.tokenizer, e.response, config.max_response_tokens) for e in examples}
    teacher_ids = {i: support.teacher_targets(t, student.tokenizer, teacher_tokenizer) for i, t in target_ids.items()}
    unmappable = [e.id for e in examples if teacher_ids[e.id] is None]
    if unmappable:  # a response token the teacher's vocabulary lacks: that example cannot be distilled token by token
        examples = [e for e in examples if teacher_ids[e.id] is not None]
        data_counts = {**data_counts, "dropped_outside_kd_support": len(unmappable)}

    # -- Teacher distributions: a top-k cache built once (main process), or the full teacher on the fly. ------------
    cache = None
    needs_teacher = any(c in KD_CHANNELS for c in channels)  # the alignment channels teach with the student's text
    if not needs_teacher:
        teacher = None
    elif config.topk > 0:
        if accelerator.is_main_process and not cache_complete(out / "teacher_cache", examples):
            teacher = teacher or load_teacher(config, accelerator)
            build_teacher_cache(  # skips examples a killed earlier build already cached
                teacher, [text_prompt(e) for e in examples], [teacher_ids[e.id] for e in examples],
                [e.id for e in examples], out / "teacher_cache", k=config.topk, batch_size=config.teacher_batch_size,
                support=support, tail_samples=config.tail_samples if config.effective_topk_tail == "sampled" else 0,
                tail_temperature=config.temperature,
                # A cache built for other targets must be refused, not silently reused.
                extra={"targets": config.targets, "max_response_tokens": config.max_response_tokens,
                       "data": config.data},
            )
        accelerator.wait_for_everyone()
        cache = TeacherCache.open(out / "teacher_cache")
        teacher = None  # free the teacher: the cache is all the loop needs
    else:
        teacher = teacher or load_teacher(config, accelerator)

    # -- Trainable parameters: LoRA on the language model (or everything but the audio encoder), optimizer, schedule.
    set_seed(config.seed)  # the LoRA init must not depend on which process prepared the data
    checkpointing = config.checkpointing_on(accelerator.device)
    model = make_trainable(student, config, checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    plan = [epoch_plan(examples, epoch, config, accelerator.process_index, accelerator.num_processes)
            for epoch in range(config.epochs)]
    total_steps = sum(len(steps) for steps in plan)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    # The scheduler is stepped by hand once per optimizer step, so it is not handed to accelerate (which would step
    # it once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    student.model = model

    done_step, examples_seen = 0, 0
    if config.resume and (state_dir := latest_train_state(out)) is not None:
        done_step, examples_seen = load_train_state(state_dir, accelerator, model, optimizer, scheduler, plan)
    run_facts = {"kd_support": support.describe(), "lora_targets": lora_targets(student, config) if config.lora else None,
                 "gradient_checkpointing": checkpointing}
    write_manifest(config, student_identity, data_counts, len(examples), total_steps, channels, finished=False,
                   extra=run_facts,
                   accelerator=accelerator)
    by_id = {e.id: e for e in examples}
    log_path = out / "train_log.jsonl"
    if accelerator.is_main_process:
        truncate_log(log_path, done_step)

    # -- The loop: one optimizer step = grad_accum micro-batches; each micro-batch runs the active channels. --------
    model.train()
    frozen_in_eval_mode(student, config)  # student.model is the prepared (wrapped) model
    stopped_early = False
    last_save = time.time()
    progress = stage("distill training", total=total_steps, unit="steps", completed=done_step,
                     enabled=accelerator.is_main_process)
    log_file = open(log_path, "a", encoding="utf-8") if accelerator.is_main_process else contextlib.nullcontext()
    planned = [(epoch, micro_batches) for epoch, steps in enumerate(plan) for micro_batches in steps]
    with progress, log_file as log:
        for step, (epoch, micro_batches) in enumerate(planned, start=1):
            if step <= done_step:
                continue  # trained before the resume; the data order is the planned one
            step_start = time.time()
            sums: dict[str, float] = {}
            for i, batch_ids in enumerate(micro_batches):
                batch = [by_id[j] for j in batch_ids]
                if any(c in AUDIO_CHANNELS for c in channels):
                    batch = attach_audio(batch, tts)  # the spoken questions, read back from the TTS cache
                targets = [target_ids[e.id] for e in batch]
                teacher_dist = teacher_mask = None
                if needs_teacher:
                    teacher_dist, teacher_mask = teacher_distribution(
                        teacher, cache, batch, targets, support, accelerator.device, [teacher_ids[e.id] for e in batch])
                text_logits = self_target_logits(student, batch, targets, channels)
                parts = []
                for c, channel in enumerate(channels):
                    # One backward per channel: only one channel's activations are alive at a time. Gradients are
                    # all-reduced once, on the last channel of the step's last micro-batch.
                    last = i == len(micro_batches) - 1 and c == len(channels) - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(model):
                        part = channel_loss(student, teacher_dist, teacher_mask, batch, targets, channel, config,
                                            support, text_logits)
                        accelerator.backward(part["loss"] / len(micro_batches))
                    parts.append({k: v.detach() for k, v in part.items()})
                losses = merge_parts(parts)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + float(value.detach()) / len(micro_batches)
                examples_seen += len(batch_ids) * accelerator.num_processes
            grad_norm = accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            record = {"step": step, "epoch": epoch, "lr": lr, **mean_over_processes(sums, accelerator),
                      "grad_norm": float(grad_norm), "examples_seen": examples_seen,
                      "seconds": round(time.time() - step_start, 4)}
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            progress.advance(1, postfix=" ".join(
                f"{k}={v:.4f}" for k, v in record.items() if k.startswith("loss_") or k == "ce"))
            last = step == total_steps
            stopped_early = config.stop_after_steps is not None and step >= config.stop_after_steps and not last
            if last or stopped_early or (config.save_every and step % config.save_every == 0) \
                    or save_is_due(last_save, config.save_every_minutes, accelerator):
                last_save = time.time()
                save_train_state(out, step, epoch, examples_seen, plan, accelerator, model, optimizer, scheduler,
                                 config)
            if stopped_early:
                break

    if stopped_early:
        accelerator.wait_for_everyone()
        return latest_train_state(out) or out

    # -- Finish: the adapter (LoRA) and/or the merged student, which ``load_model`` (and ``gap``) reads. ----------
    checkpoint = out / ("adapter" if config.lora and not config.merge else "checkpoint")
    if accelerator.is_main_process:
        checkpoint = save_student(accelerator.unwrap_model(model), student.processor, out, config)
        write_manifest(config, student_identity, data_counts, len(examples), total_steps, channels, finished=True,
                       extra=run_facts,
                       accelerator=accelerator, seconds=time.time() - started)
    accelerator.wait_for_everyone()
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# One step's losses


def teacher_distribution(teacher: Any | None, cache: TeacherCache | None, batch: Sequence[DistillExample],
                         targets: Sequence[Sequence[int]], support: KDSupport, device: Any,
                         teacher_targets: Sequence[Sequence[int]] | None = None) -> tuple[Any, torch.Tensor]:
    """The teacher's distributions over the KD support for a micro-batch, and its response mask ``(batch, longest)``:
    read from the top-k cache, or computed on the fly (the teacher reads the text question)."""
    if cache is not None:
        teacher_dist = cache.read([e.id for e in batch], length=max(len(t) for t in targets), device=device)
        return teacher_dist, teacher_dist.mask
    with torch.no_grad():
        logits, _, mask = teacher.continuation_logits([text_prompt(e) for e in batch], teacher_targets or targets)
    return support.teacher_logits(logits), mask


def self_target_logits(student: Any, batch: Sequence[DistillExample], targets: Sequence[Sequence[int]],
                       channels: Sequence[str]) -> torch.Tensor | None:
    """The student's own next-token logits given the *typed* question, detached: the teacher of ``st_prefix`` and
    ``st_self`` (``None`` when neither runs)."""
    if not {"st_prefix", "st_self"} & set(channels):
        return None
    with torch.no_grad():
        logits, _, _ = student.continuation_logits([text_prompt(e) for e in batch], targets)
    return logits


def alignment_loss(student: Any, batch: Sequence[DistillExample], targets: Sequence[Sequence[int]], channel: str,
                   config: DistillConfig, text_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """One alignment channel's weighted loss (:mod:`speechlm_eval.distill.alignment`): the student hears the question
    and is pulled towards what its own text path computes from the typed question."""
    speech = [speech_prompt(e) for e in batch]
    if channel == "st_hidden":
        layers = config.layers()
        heard = student.prompt_hidden_states(speech, layers, config.align_pool)
        with torch.no_grad():
            typed = student.prompt_hidden_states([text_prompt(e) for e in batch], layers, config.align_pool)
        value = hidden_alignment_loss(heard, typed, config.align_loss)
        return {"loss": config.lambda_hidden * value, "loss_st_hidden": value}
    logits, _, mask = student.continuation_logits(speech, targets)
    if channel == "st_prefix":
        value = prefix_kl(text_logits, logits, mask, config.prefix_positions, config.temperature)
        return {"loss": config.lambda_prefix * value, "loss_st_prefix": value}
    value = self_distillation_kl(text_logits, logits, mask, config.temperature)
    return {"loss": config.lambda_self * value, "loss_st_self": value}


def channel_loss(student: Any, teacher_dist: Any, teacher_mask: torch.Tensor | None, batch: Sequence[DistillExample],
                 targets: Sequence[Sequence[int]], channel: str, config: DistillConfig, support: KDSupport,
                 text_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One channel's weighted loss on a micro-batch. The KD channels: the student reads (``tt``) or hears (``st``)
    the question and is teacher-forced on the targets; ``λ_c·KD_c + (ce / n_kd)·CE_c`` (so the sum over the KD
    channels is the paper's weighted sum with CE averaged over them). The alignment channels: :func:`alignment_loss`.
    Returns ``{"loss", "loss_<channel>", "ce_<channel>"?}``."""
    if channel not in KD_CHANNELS:
        return alignment_loss(student, batch, targets, channel, config, text_logits)
    n_channels = max(1, sum(1 for c in config.active_channels() if c in KD_CHANNELS))
    prompts = [text_prompt(e) for e in batch] if channel == "tt" else [speech_prompt(e) for e in batch]
    logits, target_grid, mask = student.continuation_logits(prompts, targets)
    if mask.shape != teacher_mask.shape or not torch.equal(mask.cpu(), teacher_mask.cpu()):
        raise RuntimeError(f"{channel}: student and teacher response masks differ; targets are misaligned")
    logits = support.student_logits(logits)
    tail = config.effective_topk_tail if isinstance(teacher_dist, TopK) else "bucket"  # a full teacher: no tail
    kd = kd_loss(logits, teacher_dist, mask, kind=config.kind, temperature=config.temperature, beta=config.beta,
                 topk_tail=tail)
    weight = {"tt": config.lambda_tt, "st": config.lambda_st}[channel]
    out = {"loss": weight * kd, f"loss_{channel}": kd}
    if config.ce:
        out[f"ce_{channel}"] = ce_loss(logits, support.support_targets(target_grid), mask)
        out["loss"] = out["loss"] + config.ce / n_channels * out[f"ce_{channel}"]
    return out


def distill_losses(
    student: Any,
    teacher: Any | None,
    cache: TeacherCache | None,
    batch: Sequence[DistillExample],
    targets: Sequence[Sequence[int]],
    config: DistillConfig,
    channels: Sequence[str],
    support: KDSupport,
    teacher_targets: Sequence[Sequence[int]] | None = None,
) -> dict[str, torch.Tensor]:
    """The weighted loss of one micro-batch and its parts, all channels at once (the training loop instead runs one
    backward per channel, :func:`channel_loss`, so only one channel's activations are alive at a time).

    The teacher reads the text question; the student reads it (``tt``) and/or hears it (``st``). All three are
    teacher-forced on the same target tokens (``teacher_targets``: those tokens in the teacher's ids, default the
    same ids), so ``continuation_logits`` returns them right-aligned to one ``(batch, longest)`` grid and the masks
    agree. Both sides are compared over the KD ``support``.

    Returns:
        ``{"loss": λ_TT·L_TT + λ_ST·L_ST + ce·CE, "loss_tt": …, "loss_st": …, "ce": …}`` (scalars; inactive
        channels absent, ``ce`` only when its weight is non-zero).
    """
    device = next(student.model.parameters()).device
    teacher_dist = teacher_mask = None
    if any(c in KD_CHANNELS for c in channels):
        teacher_dist, teacher_mask = teacher_distribution(teacher, cache, batch, targets, support, device,
                                                          teacher_targets)
    text_logits = self_target_logits(student, batch, targets, channels)
    parts = [channel_loss(student, teacher_dist, teacher_mask, batch, targets, c, config, support, text_logits)
             for c in channels]
    return merge_parts(parts)


def merge_parts(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Channel results summed into ``loss``, their KD terms kept, their CE terms averaged into ``ce``."""
    out: dict[str, torch.Tensor] = {"loss": sum(p["loss"] for p in parts)}  # type: ignore[dict-item]
    for part in parts:
        out.update({k: v for k, v in part.items() if k.startswith("loss_")})
    ce = [v for part in parts for k, v in part.items() if k.startswith("ce_")]
    if ce:
        out["ce"] = torch.stack(ce).mean()
    return out


def response_ids(tokenizer: Any, response: str, max_tokens: int) -> list[int]:
    """Target token ids: the response (cut to ``max_tokens``), then the end-of-turn token when it fits whole."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end = end if isinstance(end, int) and end != tokenizer.unk_token_id else tokenizer.eos_token_id
    if len(ids) >= max_tokens or end is None:
        return list(ids[:max_tokens])
    return [*ids, int(end)]


# ---------------------------------------------------------------------------------------------------------------------
# Setup helpers


def make_accelerator() -> Any:
    """accelerate's ``Accelerator``: DDP under ``accelerate launch`` or ``torchrun`` (gloo on CPU), bf16 on GPU."""
    from accelerate import Accelerator

    from speechlm_eval.distributed import process_state

    process_state()  # sets up the gloo process group on CPU-only multi-process launches
    on_gpu = torch.cuda.is_available()
    return Accelerator(cpu=not on_gpu, mixed_precision="bf16" if on_gpu else "no")


def model_dtype(config: DistillConfig, accelerator: Any) -> str:
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if accelerator.device.type == "cuda" else "float32"


def load_student(config: DistillConfig, accelerator: Any) -> Any:
    from speechlm_eval.models.registry import LoadOptions, load_model

    options = LoadOptions(device=str(accelerator.device), dtype=model_dtype(config, accelerator),
                          trust_remote_code=config.trust_remote_code)
    student = load_model(config.student, options)
    if not student.accepts_audio or not isinstance(student, TrainableSpeechLM):
        raise ConfigError(f"the student {config.student!r} ({student.describe().get('family')}) is not a speech LLM "
                          "this recipe can train (it needs the TrainableSpeechLM interface)")
    return student


def load_teacher(config: DistillConfig, accelerator: Any) -> Any:
    from speechlm_eval.models.registry import LoadOptions, load_model

    options = LoadOptions(device=str(accelerator.device), dtype=model_dtype(config, accelerator),
                          trust_remote_code=config.trust_remote_code)
    teacher = load_model(config.teacher, options, family="hf-causal")
    teacher.model.requires_grad_(False)
    return teacher


def load_tokenizer(name_or_path: str, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)


def make_tts(config: DistillConfig) -> Any:
    from speechlm_eval.speech import CachedTTS, get_tts

    return CachedTTS(get_tts(config.tts_engine, voice=config.tts_voice, rate=config.tts_rate))


def make_trainable(student: Any, config: DistillConfig, checkpointing: bool = False) -> torch.nn.Module:
    """Freeze what is not trained: LoRA on the language model (default) or a full fine-tune of it; with
    ``checkpointing``, recompute activations in backward (``DistillConfig.checkpointing_on``).

    The audio encoder is always frozen; the projector trains only with ``train_projector``. The modules are found
    through the model's interface (:class:`~speechlm_eval.models.base.TrainableSpeechLM`), whatever the family
    calls them.
    """
    from speechlm_eval.models.audio_text import speech_adapter_loaded

    model = student.model
    if speech_adapter_loaded(model):
        # Granite Speech / Phi-4-multimodal: the LoRA they ship is on for audio only. Merging the student's LoRA
        # (or saving a full fine-tune) would bake that adapter into the text path or drop it: refused, not guessed.
        raise ConfigError(f"{student.family}: the checkpoint ships an audio-only LoRA adapter; distilling such a "
                          "student (keeping that adapter separate in the saved checkpoint) is not supported yet")
    model.requires_grad_(False)
    projector = student.projector() if config.train_projector else None
    if config.train_projector and projector is None:
        raise ConfigError(f"--train-projector: the {student.family} family has no audio projector")
    if config.lora:
        from peft import LoraConfig, get_peft_model

        targets = student.lora_target_modules(lora_targets(student, config))
        if not targets:
            raise ConfigError(f"nothing to train: --lora-targets {lora_targets(student, config)!r} matched no module "
                              "of the language model")
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, bias="none")
        model = get_peft_model(model, lora)
    else:
        student.language_model().requires_grad_(True)
        student.lm_head().requires_grad_(True)
        # Some families keep the audio path inside the language model's module (Phi-4-multimodal's embedding layer
        # holds its audio encoder and projector): unfreezing the language model must not unfreeze them.
        student.audio_encoder().requires_grad_(False)
        if student.projector() is not None:
            student.projector().requires_grad_(False)
    if projector is not None:
        projector.requires_grad_(True)  # the same module object inside the LoRA wrapper
    if checkpointing:
        enable_checkpointing(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if n_trainable == 0:
        raise ConfigError(f"nothing to train: --lora-targets {lora_targets(student, config)!r} matched no module")
    return model


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant: LoRA's frozen inputs need no grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.24's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def lora_targets(student: Any, config: DistillConfig) -> str:
    """The regex LoRA adapts: ``--lora-targets``, else the family's own (its language model's attention)."""
    return config.lora_targets or student.lora_targets


def frozen_in_eval_mode(student: Any, config: DistillConfig) -> None:
    """Put the frozen audio encoder (and the projector unless trained) in eval mode: no dropout in what is fixed."""
    student.audio_encoder().eval()
    projector = student.projector()
    if projector is not None and not config.train_projector:
        projector.eval()


def prepare_data(config: DistillConfig, student: Any, teacher: Any | None, tts: Any,
                 eval_items: Sequence[Any] | None) -> None:
    """Read, filter, check leakage, speak and (optionally) re-target the data; write ``OUT/data/``."""
    raw = load_distill_data(config.data, config.max_examples, config.seed)
    thresholds = {"max_words": config.max_words, "max_chars": config.max_chars,
                  "max_response_words": config.max_response_words}
    kept, counts = filter_speakable(raw, **thresholds)
    items = list(eval_items or [])
    if config.leakage_suite:
        from speechlm_eval.data.suite import load_suite, parse_suite

        items += load_suite(parse_suite(config.leakage_suite), data_dir=config.leakage_data_dir)[0]
    check_no_leakage(kept, items)
    kept, audio_counts = synthesize_questions(kept, tts, student.max_audio_seconds, keep_audio=False)
    counts.update(audio_counts)
    if config.targets == "teacher":
        kept, target_counts = teacher_targets(kept, teacher, max_new_tokens=config.max_response_tokens,
                                              batch_size=config.teacher_batch_size)
        counts.update(target_counts)
    if not kept:
        raise ConfigError(f"no distillation examples left after filtering: {counts}")
    counts["used"] = len(kept)
    counts["leakage_checked_against"] = len(items)
    data_dir = config.out / "data"
    write_examples(data_dir / "examples.jsonl", kept)
    _write_json(data_dir / "prepare.json", {"counts": counts, "thresholds": thresholds, "source": config.data,
                                            "targets": config.targets})


def read_prepared(out: Path) -> tuple[list[DistillExample], dict[str, Any]]:
    rows = [json.loads(line) for line in (out / "data" / "examples.jsonl").read_text(encoding="utf-8").splitlines()]
    counts = json.loads((out / "data" / "prepare.json").read_text())["counts"]
    return [DistillExample(**row) for row in rows], counts


def cache_complete(cache_dir: Path, examples: Sequence[DistillExample]) -> bool:
    """True when a teacher cache exists and holds every example (so a resume need not load the teacher at all)."""
    if not (cache_dir / "meta.json").exists():
        return False
    cache = TeacherCache.open(cache_dir)
    return all(e.id in cache for e in examples)


def epoch_plan(examples: Sequence[DistillExample], epoch: int, config: DistillConfig, rank: int,
               world_size: int) -> list[list[list[str]]]:
    """This process's optimizer steps for ``epoch``: lists of ``grad_accum`` micro-batches of example ids.

    The order is a seeded permutation per epoch, identical on every process and on every resume; each process takes
    every ``world_size``-th example (the last ``n % world_size`` are left out so all processes take the same number
    of steps). An epoch's last step may hold fewer micro-batches, its last micro-batch fewer examples.
    """
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
    per_process = len(examples) // world_size
    if per_process == 0:
        raise ConfigError(f"{len(examples)} examples cannot feed {world_size} processes")
    mine = [examples[i].id for i in order.tolist()[rank::world_size][:per_process]]
    micro = [mine[i : i + config.batch_size] for i in range(0, len(mine), config.batch_size)]
    return [micro[i : i + config.grad_accum] for i in range(0, len(micro), config.grad_accum)]


def mean_over_processes(values: dict[str, float], accelerator: Any) -> dict[str, float]:
    """Each logged loss averaged over processes (every process logs the same keys)."""
    if accelerator.num_processes == 1:
        return values
    names = sorted(values)
    tensor = torch.tensor([values[n] for n in names], device=accelerator.device)
    reduced = accelerator.reduce(tensor, reduction="mean")
    return dict(zip(names, reduced.tolist()))


# ---------------------------------------------------------------------------------------------------------------------
# Output directory, train states (resume) and the final checkpoint


DISTILL_OUTPUTS = ("data", "teacher_cache", "train_state", "checkpoint", "train_log.jsonl", "manifest.json")


def prepare_out_dir(config: DistillConfig, accelerator: Any) -> None:
    """Refuse to mix runs: an existing run continues only with ``--resume`` and the same training config."""
    from speechlm_eval.rundir import RunDirError, prepare_output_dir

    out = config.out
    manifest = out / "manifest.json"
    if accelerator.is_main_process:
        previous = json.loads(manifest.read_text())["config"] if manifest.exists() else None
        try:
            prepare_output_dir(out, config.to_dict(), previous=previous, has_run=manifest.exists(),
                               outputs=DISTILL_OUTPUTS, resume=config.resume, overwrite=config.overwrite,
                               what="distillation run", key="config", ignore=_RESUMABLE_CHANGES)
        except RunDirError as error:
            raise ConfigError(str(error)) from None
        out.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(out)
        if not manifest.exists():
            # Written first, so a run killed before training still owns OUT (its data and cache are reused on resume).
            _write_json(manifest, {"schema": MANIFEST_SCHEMA, "config": config.to_dict(),
                                   "our_reading": our_reading_for(config), "finished": False})
    accelerator.wait_for_everyone()


def write_manifest(config: DistillConfig, student_identity: dict[str, Any], data_counts: dict[str, Any],
                   n_examples: int, total_steps: int, channels: Sequence[str], *, finished: bool, accelerator: Any,
                   seconds: float | None = None, extra: dict[str, Any] | None = None) -> None:
    if not accelerator.is_main_process:
        return
    from speechlm_eval.rundir import package_versions

    manifest = {
        "schema": MANIFEST_SCHEMA,
        "config": config.to_dict(),
        "our_reading": our_reading_for(config),  # as this run used them, not the plain defaults
        "channels": list(channels),
        "student": student_identity,
        "data": {"source": config.data, "targets": config.targets, "examples": n_examples, "counts": data_counts},
        "tts": make_tts(config).cache_key_fields(),
        "processes": accelerator.num_processes,
        "total_steps": total_steps,
        "finished": finished,
        "seconds": seconds,
        "versions": package_versions(),
        **(extra or {}),
    }
    _write_json(config.out / "manifest.json", manifest)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name (LoRA adapters, or the fine-tuned weights), on CPU."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_rng_state(directory: Path, rank: int) -> None:
    """This process's RNG states, as JSON (Python's, NumPy's) and safetensors (torch's): nothing that unpickles."""
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    _write_json(directory / f"rng-rank{rank}.json", {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    })
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, directory / f"rng-rank{rank}.safetensors")


def load_rng_state(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    state = json.loads((directory / f"rng-rank{rank}.json").read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    tensors = load_file(directory / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def load_tensors_only(path: Path) -> Any:
    """An optimizer or scheduler state saved with ``torch.save``, read with ``weights_only=True`` (tensors and plain
    Python values only: a crafted file in an output folder cannot run code)."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(f"{path} holds more than tensors and plain values; refusing to load it ({error})") from None


def save_train_state(out: Path, step: int, epoch: int, examples_seen: int, plan: list, accelerator: Any,
                     model: torch.nn.Module, optimizer: Any, scheduler: Any, config: DistillConfig) -> Path:
    """Write ``OUT/train_state/step-NNNNNNNN/`` atomically (a temp dir renamed into place) and prune old ones.

    Holds: the trainable weights, optimizer and scheduler states, each process's RNG states, and ``state.json``
    (step, epoch, examples seen, process count, this epoch's data order).
    """
    from safetensors.torch import save_file

    root = out / "train_state"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_rng_state(tmp, accelerator.process_index)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(trainable_state(accelerator.unwrap_model(model)), tmp / "trainable.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        _write_json(tmp / "state.json", {
            "step": step, "epoch": epoch, "examples_seen": examples_seen, "processes": accelerator.num_processes,
            "data_order": [i for s in plan[epoch] for mb in s for i in mb],
        })
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[: -max(1, config.keep_states)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_is_due(last_save: float, minutes: float, accelerator: Any) -> bool:
    """True when ``minutes`` have passed since the last train state on the main process (every process agrees: the
    main process's clock decides, broadcast to the others)."""
    if not minutes:
        return False
    due = torch.tensor([1 if time.time() - last_save >= 60 * minutes else 0], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        due = broadcast(due, from_process=0)
    return bool(due.item())


def remove_interrupted_writes(out: Path) -> None:
    """What a kill between a temp write and its rename leaves: ``.tmp-step-*`` train states, a ``.checkpoint.tmp``
    folder, ``.*.tmp`` files (resume never reads them; left alone they pile up)."""
    from speechlm_eval.records import remove_stale_temps

    for leftover in [*(out / "train_state").glob(".tmp-step-*"), *out.glob(".*.tmp")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    for folder in (out, out / "data", out / "teacher_cache"):
        if folder.is_dir():
            remove_stale_temps(folder)


def latest_train_state(out: Path) -> Path | None:
    """The newest complete train state (temp dirs of an interrupted save are ignored)."""
    states = sorted((out / "train_state").glob("step-*"))
    return states[-1] if states else None


def load_train_state(state_dir: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                     plan: list) -> tuple[int, int]:
    """Restore a train state; returns ``(step, examples_seen)``. Refuses a different process count or data order."""
    from safetensors.torch import load_file

    state = json.loads((state_dir / "state.json").read_text())
    if state["processes"] != accelerator.num_processes:
        raise ConfigError(f"{state_dir} was written by {state['processes']} processes; resume with the same number "
                          f"(now {accelerator.num_processes})")
    if state["data_order"] != [i for s in plan[state["epoch"]] for mb in s for i in mb]:
        raise ConfigError(f"{state_dir}: the data order differs from the saved one (did the data change?)")
    weights = load_file(state_dir / "trainable.safetensors")
    unwrapped = accelerator.unwrap_model(model)
    missing = set(trainable_state(unwrapped)) - set(weights)
    if missing:
        raise ConfigError(f"{state_dir} lacks trained tensors such as {sorted(missing)[:3]}")
    unwrapped.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(load_tensors_only(state_dir / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors_only(state_dir / "scheduler.pt"))
    load_rng_state(state_dir, accelerator.process_index)
    return int(state["step"]), int(state["examples_seen"])


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the last train state, before a kill): a resume redoes them."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):
            continue  # a line torn by the kill
    from speechlm_eval.records import write_text_atomic

    write_text_atomic(path, "".join(kept))


def save_student(model: torch.nn.Module, processor: Any, out: Path, config: DistillConfig) -> Path:
    """Write what a user keeps, each folder replaced atomically, and return the one ``gap`` should score:

    - with LoRA, ``OUT/adapter`` (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with peft onto the
      original student, and by ``load_model``), then, unless ``--no-merge``, ``OUT/checkpoint``: the merged student;
    - with a full fine-tune, ``OUT/checkpoint``. Both carry the processor and the distillation config.
    """
    record = {"config": config.to_dict(), "our_reading": our_reading_for(config)}
    if config.lora:
        adapter = out / "adapter"
        _replace_folder(adapter, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp),
                                              _write_json(tmp / "speechlm_eval_distill.json", record)))
        if not config.merge:
            return adapter
        model = model.merge_and_unload()
    model.eval()
    checkpoint = out / "checkpoint"
    _replace_folder(checkpoint, lambda tmp: (model.save_pretrained(tmp), processor.save_pretrained(tmp),
                                             _write_json(tmp / "speechlm_eval_distill.json", record)))
    return checkpoint


def _replace_folder(final: Path, write: Any) -> None:
    """``write(tmp)`` into a temp folder beside ``final``, then swap it in (a kill leaves the old folder or a temp)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def _write_json(path: Path, obj: Any) -> None:
    from speechlm_eval.records import write_json_atomic

    write_json_atomic(path, obj)
