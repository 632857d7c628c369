"""Cross-modal knowledge distillation (Wang et al. 2025): a text LLM teacher, a speech LLM student, two channels.

T→T: the student *reads* the query, S→T: the student *hears* it (TTS); in both the teacher reads the text, and the
student's next-token distributions over the response are pulled to the teacher's. One readable recipe, shaped like
torchtune's KD recipe: :func:`setup` builds a :class:`Run` (models, data, teacher cache, optimizer, resumed state),
:func:`train` is the loop (one screen), :func:`loss_step` one micro-batch's losses and backward passes, and
:func:`finish` saves what a user keeps. Train states and the saved student live in
:mod:`speechlm_eval.distill.checkpointing`, the options in :mod:`speechlm_eval.distill.config`.

Every default the paper does not state is *our reading*: :data:`OUR_READING` lists the plain defaults, and
:func:`our_reading_for` what a run actually used (written to its manifest and report).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from speechlm_eval.distill.alignment import hidden_alignment_loss, prefix_kl, self_distillation_kl
from speechlm_eval.models.encoder_cache import EncoderCache, FeatureCache
from speechlm_eval.distill.checkpointing import (
    gathered_student_state,
    latest_train_state,
    load_train_state,
    remove_interrupted_writes,
    save_is_due,
    save_student,
    save_train_state,
    truncate_log,
    write_json,
)
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
    """Run (or resume) a distillation; returns ``OUT/checkpoint`` (the merged student + processor), ``OUT/adapter``
    with ``--no-merge``, or, when ``stop_after_steps`` ends the run early, the last train state directory.

    ``eval_items`` (:class:`~speechlm_eval.data.item.Item` s) are checked for leakage besides ``leakage_suite``.
    """
    run = setup(config, eval_items=eval_items)
    train(run)
    return finish(run)


@dataclass
class Run:
    """What :func:`setup` builds and :func:`train` / :func:`finish` use: one distillation run on this process."""

    config: DistillConfig
    accelerator: Any
    student: TrainableSpeechLM  # its ``model`` is the prepared (wrapped) trainable model once setup is done
    student_identity: dict[str, Any]  # read before wrapping: the manifest names the checkpoint distilled from
    support: KDSupport
    tts: Any
    examples: list[DistillExample]
    data_counts: dict[str, Any]
    target_ids: dict[str, list[int]]  # example id -> the response's student token ids
    teacher_ids: dict[str, list[int]]  # example id -> the same tokens in the teacher's ids
    teacher: Any | None  # only when the teacher is computed on the fly (``--topk 0``)
    cache: TeacherCache | None
    model: torch.nn.Module
    trainable: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    plan: list[list[list[list[str]]]]  # per epoch, per optimizer step, per micro-batch: example ids (this process)
    run_facts: dict[str, Any]
    audio_cache: EncoderCache | None = None  # the frozen audio encoder's outputs per clip (--cache-audio-encoder)
    feature_cache: FeatureCache | None = None  # the student's log-mel features per clip (same switch)
    started: float = field(default_factory=time.time)
    done_step: int = 0  # optimizer steps already taken (a resumed run starts after them)
    examples_seen: int = 0  # over all processes
    stopped_early: bool = False

    @property
    def channels(self) -> tuple[str, ...]:
        return self.config.active_channels()

    @property
    def total_steps(self) -> int:
        return sum(len(steps) for steps in self.plan)

    @property
    def needs_teacher(self) -> bool:
        """The KD channels read the teacher's distributions; the alignment channels teach with the student's text."""
        return any(c in KD_CHANNELS for c in self.channels)

    @property
    def examples_by_id(self) -> dict[str, DistillExample]:
        return {e.id: e for e in self.examples}

    def planned_steps(self) -> Iterator[tuple[int, int, list[list[str]]]]:
        """``(step, epoch, micro_batches)`` for every optimizer step of the run, steps counted from 1."""
        planned = [(epoch, micro_batches) for epoch, steps in enumerate(self.plan) for micro_batches in steps]
        for step, (epoch, micro_batches) in enumerate(planned, start=1):
            yield step, epoch, micro_batches


# ---------------------------------------------------------------------------------------------------------------------
# The recipe: setup -> train -> finish


def setup(config: DistillConfig, *, eval_items: Sequence[Any] | None = None) -> Run:
    """Everything before the first step: resolve the config, claim ``OUT``, load the student, prepare the data and
    the teacher's distributions, make the trainable model and its optimizer, and restore a train state on resume."""
    from accelerate.utils import set_seed

    started = time.time()
    config = resolve_distill_config(config)
    accelerator = make_accelerator(config)
    prepare_out_dir(config, accelerator)
    set_seed(config.seed)
    student = load_student(config, accelerator)
    student_identity = student.describe()
    set_threads(config.threads, accelerator.device, student_identity.get("parameters") or 0)
    teacher_tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)
    # The ids KD compares: the teacher's whole vocabulary when the student only adds tokens after it (audio
    # placeholders), else the token strings both share (ids that mean different things are masked out).
    support = kd_support(teacher_tokenizer, student.tokenizer)
    tts = make_tts(config)
    teacher = None
    if accelerator.is_main_process and not (config.out / "data" / "examples.jsonl").exists():
        if config.targets == "teacher":
            teacher = load_teacher(config, accelerator)
        prepare_data(config, student, teacher, tts, eval_items)  # main process first; the others read its files
    accelerator.wait_for_everyone()
    examples, data_counts, target_ids, teacher_ids = distillable_examples(config, student.tokenizer,
                                                                          teacher_tokenizer, support)
    teacher, cache = teacher_source(config, accelerator, examples, teacher_ids, support, teacher)

    set_seed(config.seed)  # the LoRA init must not depend on which process prepared the data
    checkpointing = config.checkpointing_on(accelerator.device)
    model = make_trainable(student, config, checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    plan = [epoch_plan(examples, epoch, config, accelerator.process_index, accelerator.num_processes)
            for epoch in range(config.epochs)]
    scheduler = make_scheduler(optimizer, config, sum(len(steps) for steps in plan))
    # The scheduler is stepped by hand once per optimizer step, so it is not handed to accelerate (which would step
    # it once per process).
    model, optimizer = accelerator.prepare(model, optimizer)
    student.model = model
    run = Run(config=config, accelerator=accelerator, student=student, student_identity=student_identity,
              support=support, tts=tts, examples=examples, data_counts=data_counts, target_ids=target_ids,
              teacher_ids=teacher_ids, teacher=teacher, cache=cache, model=model, trainable=trainable,
              optimizer=optimizer, scheduler=scheduler, plan=plan, started=started,
              run_facts={"kd_support": support.describe(),
                         "lora_targets": lora_targets(student, config) if config.lora else None,
                         "gradient_checkpointing": checkpointing,
                         "distributed_type": accelerator.distributed_type.value}
              | ({} if getattr(student, "system_with_audio", True) else {
                  "speech_prompt_system": "text in the user turn after the audio: the student's tokenizer takes no "
                                          "system turn beside audio"}))
    run.audio_cache = make_audio_cache(run)
    run.feature_cache = make_feature_cache(run)
    if config.resume and (state_dir := latest_train_state(config.out)) is not None:
        run.done_step, run.examples_seen = load_train_state(state_dir, accelerator, model, optimizer, scheduler, plan)
    write_run_manifest(run, finished=False)
    start_tracking(config, accelerator)
    return run


def train(run: Run) -> None:
    """The loop: one optimizer step = ``grad_accum`` micro-batches (:func:`loss_step` each), clipped, logged to
    ``OUT/train_log.jsonl`` and the progress line, with a train state every ``--save-every`` steps / minutes."""
    config, accelerator = run.config, run.accelerator
    log_path = config.out / "train_log.jsonl"
    if accelerator.is_main_process:
        truncate_log(log_path, run.done_step)  # lines past the last train state: a resume redoes those steps
    run.model.train()
    frozen_in_eval_mode(run.student, config)
    last_save = time.time()
    progress = stage("distill training", total=run.total_steps, unit="steps", completed=run.done_step,
                     enabled=accelerator.is_main_process)
    log_file = open(log_path, "a", encoding="utf-8") if accelerator.is_main_process else contextlib.nullcontext()
    audio_cache = run.audio_cache.installed() if run.audio_cache else contextlib.nullcontext()
    features = run.feature_cache.installed(run.student.processor) if run.feature_cache else contextlib.nullcontext()
    with progress, log_file as log, audio_cache, features as features_installed:
        if features_installed is False:
            run.feature_cache = None  # a processor that is a frozen record keeps its own extractor: uncached
        for step, epoch, micro_batches in run.planned_steps():
            if step <= run.done_step:
                continue  # trained before the resume; the data order is the planned one
            step_start = time.time()
            sums: dict[str, float] = {}
            for i, batch_ids in enumerate(micro_batches):
                losses = loss_step(run, batch_ids, len(micro_batches), sync=i == len(micro_batches) - 1)
                for name, value in losses.items():
                    sums[name] = sums.get(name, 0.0) + value / len(micro_batches)
                run.examples_seen += len(batch_ids) * accelerator.num_processes
            grad_norm, lr = optimizer_step(run)
            seconds = time.time() - step_start
            record = {"step": step, "epoch": epoch, "lr": lr, **mean_over_processes(sums, accelerator),
                      "grad_norm": grad_norm, "examples_seen": run.examples_seen, "seconds": round(seconds, 4)}
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if accelerator.trackers:
                tokens = sum(len(run.target_ids[j]) for batch_ids in micro_batches for j in batch_ids)
                accelerator.log(tracked_values(record, tokens * accelerator.num_processes, seconds,
                                               accelerator.device), step=step)
            progress.advance(1, postfix=" ".join(
                f"{k}={v:.4f}" for k, v in record.items() if k.startswith("loss_") or k == "ce"))
            last = step == run.total_steps
            run.stopped_early = config.stop_after_steps is not None and step >= config.stop_after_steps and not last
            if last or run.stopped_early or (config.save_every and step % config.save_every == 0) \
                    or save_is_due(last_save, config.save_every_minutes, accelerator):
                last_save = time.time()
                save_train_state(config.out, step, epoch, run.examples_seen, run.plan, accelerator, run.model,
                                 run.optimizer, run.scheduler, config)
            if run.stopped_early:
                break


def finish(run: Run) -> Path:
    """Save the adapter (LoRA) and/or the merged student, which ``load_model`` (and ``gap``) reads, and mark the
    manifest finished; returns the folder ``gap`` should score. A run stopped early returns its last train state."""
    config, accelerator = run.config, run.accelerator
    for tracker in accelerator.trackers:  # not end_training(): that also destroys the process group
        tracker.finish()  # closes the --report-to tracker (flushes its files)
    if run.stopped_early:
        accelerator.wait_for_everyone()
        return latest_train_state(config.out) or config.out
    checkpoint = config.out / ("adapter" if config.lora and not config.merge else "checkpoint")
    sharded = accelerator.distributed_type.value == "FSDP"
    state = gathered_student_state(run.model, config.lora) if sharded else None  # every process: a collective
    if run.audio_cache is not None:
        run.run_facts["audio_encoder_cache"] = run.audio_cache.stats.as_dict()
    if run.feature_cache is not None:
        run.run_facts["audio_feature_cache"] = run.feature_cache.stats.as_dict()
    if accelerator.is_main_process:
        checkpoint = save_student(accelerator.unwrap_model(run.model), run.student.processor, config.out, config,
                                  state_dict=state,
                                  speech_adapter_folder=getattr(run.student, "speech_adapter_folder", None))
        write_run_manifest(run, finished=True, seconds=time.time() - run.started)
    accelerator.wait_for_everyone()
    return checkpoint


# ---------------------------------------------------------------------------------------------------------------------
# One step: the micro-batch's losses, then the optimizer's step


def loss_step(run: Run, batch_ids: Sequence[str], accumulation: int, *, sync: bool) -> dict[str, float]:
    """One micro-batch: each active channel's forward and backward (loss divided by ``accumulation``, the step's
    micro-batch count), so only one channel's activations are alive at a time. Gradients are all-reduced once, on the
    last channel when ``sync`` (the step's last micro-batch). Returns the micro-batch's logged losses."""
    config, accelerator = run.config, run.accelerator
    batch = [run.examples_by_id[j] for j in batch_ids]
    if any(c in AUDIO_CHANNELS for c in run.channels):
        batch = attach_audio(batch, run.tts)  # the spoken questions, read back from the TTS cache
    targets = [run.target_ids[e.id] for e in batch]
    teacher_dist = teacher_mask = None
    if run.needs_teacher:
        teacher_dist, teacher_mask = teacher_distribution(
            run.teacher, run.cache, batch, targets, run.support, accelerator.device,
            [run.teacher_ids[e.id] for e in batch])
    text_logits = self_target_logits(run.student, batch, targets, run.channels)
    parts = []
    for c, channel in enumerate(run.channels):
        last = sync and c == len(run.channels) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(run.model):
            part = channel_loss(run.student, teacher_dist, teacher_mask, batch, targets, channel, config, run.support,
                                text_logits)
            accelerator.backward(part["loss"] / accumulation)
        parts.append({k: v.detach() for k, v in part.items()})
    return {name: float(value.detach()) for name, value in merge_parts(parts).items()}


def optimizer_step(run: Run) -> tuple[float, float]:
    """Clip, step the optimizer and the schedule, clear the gradients; returns ``(grad_norm, lr)`` (the lr this step
    used)."""
    grad_norm = run.accelerator.clip_grad_norm_(run.trainable, run.config.max_grad_norm)
    lr = run.scheduler.get_last_lr()[0]
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(grad_norm), lr



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
    speech = [speech_prompt(e, getattr(student, "system_with_audio", True)) for e in batch]
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
    prompts = ([text_prompt(e) for e in batch] if channel == "tt" else
               [speech_prompt(e, getattr(student, "system_with_audio", True)) for e in batch])
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


def distillable_examples(config: DistillConfig, student_tokenizer: Any, teacher_tokenizer: Any, support: KDSupport
                         ) -> tuple[list[DistillExample], dict[str, Any], dict[str, list[int]], dict[str, list[int]]]:
    """The prepared examples (``OUT/data``) whose response tokens all lie in the KD support, their data counts, and
    their target ids in the student's and the teacher's vocabularies (by example id)."""
    examples, data_counts = read_prepared(config.out)
    target_ids = {e.id: response_ids(student_tokenizer, e.response, config.max_response_tokens) for e in examples}
    teacher_ids = {i: support.teacher_targets(t, student_tokenizer, teacher_tokenizer) for i, t in target_ids.items()}
    unmappable = [e.id for e in examples if teacher_ids[e.id] is None]
    if unmappable:  # a response token the teacher's vocabulary lacks: that example cannot be distilled token by token
        examples = [e for e in examples if teacher_ids[e.id] is not None]
        data_counts = {**data_counts, "dropped_outside_kd_support": len(unmappable)}
    return examples, data_counts, target_ids, teacher_ids


def teacher_source(config: DistillConfig, accelerator: Any, examples: Sequence[DistillExample],
                   teacher_ids: dict[str, list[int]], support: KDSupport, teacher: Any | None
                   ) -> tuple[Any | None, TeacherCache | None]:
    """Where the teacher's distributions come from: ``(None, cache)`` with a top-k cache (built once, on the main
    process, resuming a killed build), ``(teacher, None)`` for the full teacher on the fly (``--topk 0``), and
    ``(None, None)`` when no active channel reads the teacher. ``teacher`` is one already loaded, if any."""
    if not any(c in KD_CHANNELS for c in config.active_channels()):
        return None, None
    if config.topk == 0:
        return teacher or load_teacher(config, accelerator), None
    if accelerator.is_main_process and not cache_complete(config.out / "teacher_cache", examples):
        teacher = teacher or load_teacher(config, accelerator)
        build_teacher_cache(  # skips examples a killed earlier build already cached
            teacher, [text_prompt(e) for e in examples], [teacher_ids[e.id] for e in examples],
            [e.id for e in examples], config.out / "teacher_cache", k=config.topk,
            batch_size=config.teacher_batch_size, support=support,
            tail_samples=config.tail_samples if config.effective_topk_tail == "sampled" else 0,
            tail_temperature=config.temperature,
            # A cache built for other targets must be refused, not silently reused.
            extra={"targets": config.targets, "max_response_tokens": config.max_response_tokens, "data": config.data},
        )
    accelerator.wait_for_everyone()
    return None, TeacherCache.open(config.out / "teacher_cache")  # the teacher is freed: the cache is all we need


def audio_caching(run: Run) -> bool:
    """Whether the audio caches apply: ``--cache-audio-encoder`` is on and an audio channel runs."""
    return run.config.cache_audio_encoder and any(c in AUDIO_CHANNELS for c in run.channels)


def make_audio_cache(run: Run) -> EncoderCache | None:
    """The frozen audio encoder's per-clip output cache, when an audio channel runs and ``--cache-audio-encoder``
    is on (the encoder is always frozen and in eval mode here; the projector after it may train); half of
    ``--audio-cache-gib`` (the features get the other half). Not under FSDP: a sharded encoder gathers its weights in
    every forward, and processes whose clips hit the cache while another's miss would leave that process waiting in
    the gather."""
    if not audio_caching(run):
        return None
    if run.accelerator.distributed_type.value == "FSDP":
        return None
    return EncoderCache(run.student.audio_encoder(), max_bytes=int(run.config.audio_cache_gib * 2**30) // 2)


def make_feature_cache(run: Run) -> FeatureCache | None:
    """The student's log-mel features per clip (:class:`~speechlm_eval.models.encoder_cache.FeatureCache`), on the
    same switch and with the other half of ``--audio-cache-gib``: every epoch and audio channel hears the same TTS
    clips, so each is extracted once. Under FSDP too (it runs on the CPU before the model, no collective in it);
    ``None`` for a student whose processor has no feature extractor to stand in for. Installed on the student's
    processor for the training loop (:meth:`FeatureCache.installed`)."""
    if not audio_caching(run):
        return None
    extractor = getattr(getattr(run.student, "processor", None), "feature_extractor", None)
    return None if extractor is None else FeatureCache(extractor, int(run.config.audio_cache_gib * 2**30) // 2)


def make_scheduler(optimizer: Any, config: DistillConfig, total_steps: int) -> Any:
    """Linear warmup over ``warmup_ratio`` of the steps, then cosine decay to 0 (one step per optimizer step)."""
    from transformers import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)


def make_accelerator(config: DistillConfig) -> Any:
    """accelerate's ``Accelerator``: DDP under ``accelerate launch`` or ``torchrun`` (gloo on CPU), bf16 on GPU, and
    the ``--report-to`` tracker (its files under ``OUT/tracking``)."""
    from accelerate import Accelerator

    from speechlm_eval.distributed import process_state

    check_tracker_installed(config.report_to)
    process_state()  # sets up the gloo process group on CPU-only multi-process launches
    on_gpu = torch.cuda.is_available()
    log_with = None if config.report_to == "none" else config.report_to
    return Accelerator(cpu=not on_gpu, mixed_precision="bf16" if on_gpu else "no", log_with=log_with,
                       project_dir=str(config.out / "tracking") if log_with else None)


TRACKER_INSTALL = {"tensorboard": "pip install 'speechlm-eval[tracking]'", "wandb": "pip install wandb"}


def check_tracker_installed(report_to: str) -> None:
    """Refuse a ``--report-to`` tracker whose package is missing (accelerate would drop it without a word)."""
    import importlib.util

    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise ConfigError(f"--report-to {report_to} needs the {report_to} package: {TRACKER_INSTALL[report_to]}")


def start_tracking(config: DistillConfig, accelerator: Any) -> None:
    """Open the ``--report-to`` tracker's run ``distill`` with the config as its hyperparameters (no-op for none)."""
    if config.report_to == "none":
        return
    # Trackers take flat scalars and strings as hyperparameters; unset options are left out.
    hparams = {k: v for k, v in config.to_dict().items() if isinstance(v, (bool, int, float, str))}
    init = {"wandb": {"dir": str(config.out / "tracking")}} if config.report_to == "wandb" else {}
    (config.out / "tracking").mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("distill", config=hparams, init_kwargs=init)


def tracked_values(record: dict[str, Any], tokens: int, seconds: float, device: Any) -> dict[str, float]:
    """What a step sends to the tracker: its logged losses (``loss``, ``loss_<channel>``, ``ce``), ``lr`` and
    ``grad_norm``, the response tokens distilled per second over all processes (each token once, whatever the
    channel count), and this process's peak memory in GiB (allocated on a GPU, resident set size on CPU)."""
    values = {k: float(v) for k, v in record.items() if k.startswith(("loss", "ce")) or k in ("lr", "grad_norm")}
    values["tokens_per_s"] = tokens / seconds if seconds > 0 else 0.0
    values["memory_gib"] = peak_memory_bytes(device) / 2**30
    return values


def peak_memory_bytes(device: Any) -> int:
    """The process's peak memory so far: ``torch.cuda.max_memory_allocated`` on a GPU, the peak RSS otherwise."""
    if getattr(device, "type", str(device)) == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def model_dtype(config: DistillConfig, accelerator: Any) -> str:
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if accelerator.device.type == "cuda" else "float32"


def load_student(config: DistillConfig, accelerator: Any) -> Any:
    from speechlm_eval.models.registry import FAMILIES, LoadOptions, load_model

    options = LoadOptions(device=str(accelerator.device), dtype=model_dtype(config, accelerator),
                          trust_remote_code=config.trust_remote_code)
    student = load_model(config.student, options)
    family = FAMILIES.get(student.family) if student.family in FAMILIES.names() else None
    if family is not None and family.not_distillable:
        raise ConfigError(f"the student {config.student!r} is a {student.family} checkpoint: {family.not_distillable}")
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
    calls them. A checkpoint's own audio-only LoRA (Granite Speech, Phi-4-multimodal) stays frozen and separate:
    distillation's LoRA joins it on the same layers and is on for every prompt, the speech adapter for audio only
    (:mod:`speechlm_eval.models.speech_adapter`; :func:`~.checkpointing.save_student` saves it apart again).
    """
    from speechlm_eval.models.speech_adapter import (beside_speech_adapter, freeze_speech_adapter,
                                                     speech_adapter_loaded)

    model = student.model
    keeps_speech_adapter = speech_adapter_loaded(model)
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
        with beside_speech_adapter() if keeps_speech_adapter else contextlib.nullcontext():
            model = get_peft_model(model, lora)
    else:
        student.language_model().requires_grad_(True)
        student.lm_head().requires_grad_(True)
        # Some families keep the audio path inside the language model's module (Phi-4-multimodal's embedding layer
        # holds its audio encoder and projector): unfreezing the language model must not unfreeze them.
        student.audio_encoder().requires_grad_(False)
        if student.projector() is not None:
            student.projector().requires_grad_(False)
        for module in getattr(student, "kept_frozen", list)():  # e.g. Phi-4-multimodal's vision path
            module.requires_grad_(False)
    if keeps_speech_adapter:
        freeze_speech_adapter(model)  # peft, or unfreezing the language model, turned its gradients on
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
    write_json(data_dir / "prepare.json", {"counts": counts, "thresholds": thresholds, "source": config.data,
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
# Output directory and manifest


DISTILL_OUTPUTS = ("data", "teacher_cache", "train_state", "checkpoint", "adapter", "train_log.jsonl",
                   "manifest.json", "tracking")


PATH_FIELDS = ("student", "teacher", "data", "leakage_data_dir")


def portable_config(config: DistillConfig) -> dict[str, Any]:
    """The config as the manifest records it: local paths written as :func:`~speechlm_eval.rundir.portable_path`
    does (package data as ``speechlm_eval/...``, paths beside OUT relative to it) and OUT itself as ``.``, so an
    output folder holds no machine's absolute paths and a copied folder can be resumed."""
    from speechlm_eval.rundir import portable_path

    values = config.to_dict()
    for name in PATH_FIELDS:
        values[name] = portable_path(values.get(name), config.out)
    values["out"] = "."
    return values


def prepare_out_dir(config: DistillConfig, accelerator: Any) -> None:
    """Refuse to mix runs: an existing run continues only with ``--resume`` and the same training config."""
    from speechlm_eval.rundir import RunDirError, prepare_output_dir

    out = config.out
    manifest = out / "manifest.json"
    if accelerator.is_main_process:
        previous = json.loads(manifest.read_text())["config"] if manifest.exists() else None
        try:
            prepare_output_dir(out, portable_config(config), previous=previous, has_run=manifest.exists(),
                               outputs=DISTILL_OUTPUTS, resume=config.resume, overwrite=config.overwrite,
                               what="distillation run", key="config", ignore=_RESUMABLE_CHANGES)
        except RunDirError as error:
            raise ConfigError(str(error)) from None
        out.mkdir(parents=True, exist_ok=True)
        remove_interrupted_writes(out)
        if not manifest.exists():
            # Written first, so a run killed before training still owns OUT (its data and cache are reused on resume).
            write_json(manifest, {"schema": MANIFEST_SCHEMA, "config": portable_config(config),
                                   "our_reading": our_reading_for(config), "finished": False})
    accelerator.wait_for_everyone()


def write_run_manifest(run: Run, *, finished: bool, seconds: float | None = None) -> None:
    """``OUT/manifest.json`` for ``run`` (main process only): the config, what the run used, and whether it finished."""
    write_manifest(run.config, run.student_identity, run.data_counts, len(run.examples), run.total_steps,
                   run.channels, finished=finished, accelerator=run.accelerator, seconds=seconds, extra=run.run_facts)


def write_manifest(config: DistillConfig, student_identity: dict[str, Any], data_counts: dict[str, Any],
                   n_examples: int, total_steps: int, channels: Sequence[str], *, finished: bool, accelerator: Any,
                   seconds: float | None = None, extra: dict[str, Any] | None = None) -> None:
    if not accelerator.is_main_process:
        return
    from speechlm_eval.rundir import package_versions, portable_path

    manifest = {
        "schema": MANIFEST_SCHEMA,
        "config": portable_config(config),
        "our_reading": our_reading_for(config),  # as this run used them, not the plain defaults
        "channels": list(channels),
        "student": {**student_identity, "id": portable_path(student_identity.get("id"), config.out)},
        "data": {"source": portable_path(config.data, config.out), "targets": config.targets, "examples": n_examples, "counts": data_counts},
        "tts": make_tts(config).cache_key_fields(),
        "processes": accelerator.num_processes,
        "total_steps": total_steps,
        "finished": finished,
        "seconds": seconds,
        "versions": package_versions(),
        **(extra or {}),
    }
    write_json(config.out / "manifest.json", manifest)
