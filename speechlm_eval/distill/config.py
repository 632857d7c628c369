"""The configuration of a distillation run: every option, its default and help, which defaults are our reading of the
paper rather than the paper's, and the one resolution step that fills the defaults (the embedded organism's when no
student is given)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from speechlm_eval.distill.data import FILTER_DEFAULTS

MANIFEST_SCHEMA = "speechlm-eval/distill-manifest/v1"

OUR_READING: dict[str, str] = {
    "loss": "forward KL(teacher ‖ student) per response token at temperature 2, scaled by τ², averaged over the "
    "response tokens of the batch (paper: 'KL divergence with temperature scaling'; direction, τ and reduction ours)",
    "weights": "λ_TT = λ_ST = 1, no CE term (ce = 0); with ce > 0, CE is averaged over the active channels",
    "teacher": "cached as its top-64 log-probs per response token, its exact tempered tail mass and 64 ids sampled "
    "from the tail (forward KL; other divergences: one rest class); --topk 0 = full vocabulary on the fly",
    "targets": "the dataset's response (Open-Orca 'response'), cut to 256 tokens, end-of-turn token appended",
    "prompts": "the system prompt stays text in both channels; only the question is spoken (S→T)",
    "trained": "LoRA r=16, α=32, dropout 0.05 on q/k/v/o of the language model; audio encoder and projector frozen",
    "optimizer": "AdamW lr 1e-4, no weight decay, 3% linear warmup then cosine decay, 1 epoch, batch 8, "
    "gradient clipping at norm 1.0",
    "precision": "bf16 weights and autocast on GPU, fp32 on CPU",
    "data": "rows read before filtering; speakable filter " + json.dumps(FILTER_DEFAULTS, sort_keys=True),
    "speech": "espeak-ng, voice en-us, 160 words per minute; clips longer than the student's audio window dropped",
}


class ConfigError(ValueError):
    """A distillation run that cannot start as configured (raised before models load where possible)."""


def _opt(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - "help" as on a command line
    return field(default=default, metadata={"help": help, **kwargs})


# The output-level KD channels of the paper, then the alignment channels (speechlm_eval.distill.alignment).
CHANNELS = ("tt", "st", "st_hidden", "st_prefix", "st_self")
KD_CHANNELS = ("tt", "st")  # the ones that read the teacher's distributions
AUDIO_CHANNELS = ("st", "st_hidden", "st_prefix", "st_self")

# Where the plain default of a field is resolved late (``None`` until :func:`resolve_distill_config`) because the
# embedded organism has its own (:data:`speechlm_eval.embedded.ORGANISM_DISTILL_DEFAULTS`).
STANDARD_DEFAULTS: dict[str, Any] = {
    "data": "bundled",
    "targets": "dataset",
    "lora": True,
    "lr": 1e-4,
    "epochs": 1,
    "batch_size": 8,
    "warmup_ratio": 0.03,
    "tts_voice": "en-us",
    "teacher_batch_size": 8,
}


def _late(help: str, **kwargs: Any) -> Any:  # noqa: A002
    """A field whose default depends on whether the embedded organism is distilled (both named in the help)."""
    return field(default=None, metadata={"help": help, "late": True, **kwargs})


@dataclass
class DistillConfig:
    """Everything that determines a distillation run; each field is also a ``speechlm-eval distill`` option.

    Defaults marked *our reading* in their help are our decisions, not the paper's (see :data:`OUR_READING`). Fields
    left ``None`` here are filled by :func:`resolve_distill_config`: with no ``student`` (and no ``teacher``) the
    embedded organism is distilled with its own data and settings, otherwise :data:`STANDARD_DEFAULTS` apply.
    """

    student: str | None = _opt(None, "speech LLM to distil into (path or hub id; Qwen2-Audio family). Omitted: the "
                               "embedded model organism, with its own data and defaults")
    teacher: str | None = _opt(None, "text LLM teacher with the student's tokenizer (path or hub id); needs --student")
    out: Path = _opt(Path("runs/distill"), "output directory (train state, logs, OUT/checkpoint)")
    data: str | None = _late("'bundled', a local .jsonl/.parquet file, or a hub id such as Open-Orca/OpenOrca "
                             "(default: bundled; embedded organism: its distill.jsonl)")
    max_examples: int | None = _opt(None, "read at most this many rows (before filtering)")
    targets: Literal["dataset", "teacher"] | None = _late("response to distil on: the dataset's or the teacher's own "
                                                          "greedy generation (default: dataset, our reading; embedded "
                                                          "organism: teacher)")
    max_response_tokens: int = _opt(256, "cut target responses to this many tokens (our reading)")
    channels: str = _opt("tt,st", "distillation channels, comma-separated: tt (text→text KD), st (speech→text KD), "
                         "and the alignment channels st_hidden (the LM's hidden states given audio pulled to those "
                         "given text), st_prefix (next-token KL audio vs text at the first response positions), "
                         "st_self (the student's text path as the teacher of its speech path)")
    lambda_tt: float = _opt(1.0, "weight of the T→T loss (our reading)")
    lambda_st: float = _opt(1.0, "weight of the S→T loss (our reading)")
    lambda_hidden: float = _opt(1.0, "weight of the st_hidden loss")
    lambda_prefix: float = _opt(1.0, "weight of the st_prefix loss")
    lambda_self: float = _opt(1.0, "weight of the st_self loss")
    align_layers: str = _opt("-1", "st_hidden: the LM layers whose outputs are aligned, comma-separated (0 = embeddings, "
                             "-1 = the last layer)")
    align_pool: Literal["last", "mean"] = _opt("last", "st_hidden: pool the prompt at its last position or over all "
                                               "its positions")
    align_loss: Literal["cosine", "mse"] = _opt("cosine", "st_hidden: 1 − cosine (scale-free) or MSE")
    prefix_positions: int = _opt(1, "st_prefix: response positions aligned (1 = the first answer token only)", min=1)
    ce: float = _opt(0.0, "weight of cross-entropy on the target tokens (our reading: 0)")
    kind: Literal["forward_kl", "reverse_kl", "jsd"] = _opt("forward_kl", "divergence (our reading: forward KL)")
    temperature: float = _opt(2.0, "softmax temperature τ; losses are scaled by τ² (our reading: 2)")
    beta: float = _opt(0.5, "JSD mixing weight (kind=jsd only)")
    topk: int = _opt(64, "teacher log-probs cached per token; 0 = full teacher distribution on the fly (our reading)")
    topk_tail: Literal["sampled", "bucket", "renormalize"] = _opt(
        "sampled", "how the cached top-k teacher's mass outside its k ids enters the loss: 'sampled' = exact "
        "tempered tail mass plus --tail-samples ids drawn from the tail (loss within 1% of the full teacher's at τ=2 "
        "on LM-like teachers, benchmarks/bench_distill.py), 'bucket' = one rest class shaped like the student's "
        "tail, 'renormalize' = drop the tail. sampled estimates forward KL only: other --kind values use bucket")
    tail_samples: int = _opt(64, "tail ids drawn per token for topk_tail=sampled (about doubles the cache)", min=1)
    lora: bool | None = _late("train LoRA adapters on the language model; --no-lora / --full = full fine-tune "
                              "(default: LoRA; embedded organism: full fine-tune)", off_alias="--full")
    lora_r: int = _opt(16, "LoRA rank (our reading)")
    lora_alpha: int = _opt(32, "LoRA alpha (our reading)")
    lora_dropout: float = _opt(0.05, "LoRA dropout (our reading)")
    lora_targets: str | None = _opt(None, "regex of the modules LoRA adapts (default: the family's, its language "
                                    "model's attention projections)")
    train_projector: bool = _opt(False, "also train the audio→LLM projector (the audio encoder is always frozen)")
    lr: float | None = _late("peak learning rate (default: 1e-4, our reading; embedded organism: 3e-4)")
    weight_decay: float = _opt(0.0, "AdamW weight decay (our reading)")
    warmup_ratio: float | None = _late("share of the steps with linear warmup, then cosine decay (default: 0.03, our "
                                       "reading; embedded organism: 0.05)")
    epochs: int | None = _late("passes over the data (default: 1, our reading; embedded organism: 24)", min=1)
    batch_size: int | None = _late("examples per micro-batch per process (default: 8, our reading; embedded "
                                   "organism: 24)", min=1)
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_grad_norm: float = _opt(1.0, "gradient clipping norm (our reading)")
    gradient_checkpointing: Literal["auto", "on", "off"] = _opt(
        "auto", "recompute the language model's activations in backward to save memory (a 7B student's saved "
        "activations shrink ~3x, benchmarks/bench_distill_memory.py): auto = on when training on a GPU, off on CPU "
        "(where memory is rarely the limit and the recompute costs time); the manifest records what the run used")
    seed: int = _opt(0, "seed of the data order, LoRA init and dropout")
    save_every: int = _opt(0, "write a resumable train state every N optimizer steps (0: by time only)")
    save_every_minutes: float = _opt(10.0, "write a resumable train state at least this often (0: by step only), so a "
                                     "killed run loses at most this much training")
    keep_states: int = _opt(2, "train states kept on disk (older ones are deleted)")
    resume: bool = _opt(False, "continue from the last train state in OUT (same config required)")
    overwrite: bool = _opt(False, "delete a previous run in OUT and start over")
    stop_after_steps: int | None = _opt(None, "stop (saving a train state) after this many optimizer steps; the "
                                        "schedule is unchanged, so --resume continues the same run")
    dtype: str = _opt("auto", "model dtype: auto = bf16 on GPU, fp32 on CPU (our reading)")
    tts_engine: str = _opt("espeak-ng", "TTS engine that speaks the questions (our reading)")
    tts_voice: str | None = _late("TTS voice (default: en-us, our reading; embedded organism: en-gb, a training "
                                  "voice, so its evaluation voice stays unheard)")
    tts_rate: int = _opt(160, "TTS speaking rate, words per minute (our reading)")
    teacher_batch_size: int | None = _late("batch size for teacher generation and caching (default: 8; embedded "
                                           "organism: 32)", min=1)
    leakage_suite: str | None = _opt(None, "evaluation suite spec (e.g. 'voicebench') whose items must not be "
                                     "distillation questions; the run stops if one is (embedded organism: its suite)")
    leakage_data_dir: str | None = _opt(None, "local data directory for --leakage-suite")
    max_words: int = _opt(FILTER_DEFAULTS["max_words"], "drop questions longer than this many words (our reading)")
    max_chars: int = _opt(FILTER_DEFAULTS["max_chars"], "drop questions longer than this many characters")
    max_response_words: int | None = _opt(FILTER_DEFAULTS["max_response_words"], "drop longer responses")
    trust_remote_code: bool = _opt(False, "pass trust_remote_code to transformers")
    threads: int | None = _opt(None, "torch threads per process (default: 1 on CPU for models under 100 M "
                               "parameters, torch's default otherwise)", min=1)
    cache_audio_encoder: bool = _opt(True, "keep the frozen audio encoder's outputs and the log-mel features per "
                                     "clip (in CPU memory) and reuse them in later steps, channels and epochs instead "
                                     "of re-extracting and re-encoding the clip; cached and uncached runs agree to "
                                     "float tolerance")
    audio_cache_gib: float = _opt(8.0, "most CPU memory the audio caches hold (GiB; half for encoder outputs, half "
                                  "for features); clips past it are re-encoded each time")
    report_to: Literal["none", "tensorboard", "wandb"] = _opt(
        "none", "send the per-step losses (per channel), lr, grad norm, tokens/s and peak memory to a tracker through "
        "accelerate: tensorboard (events in OUT/tracking/distill; pip install 'speechlm-eval[tracking]') or wandb "
        "(pip install wandb; its files under OUT/tracking); OUT/train_log.jsonl is written either way")
    merge: bool = _opt(True, "with LoRA, also write the merged model to OUT/checkpoint (the adapter is always saved "
                       "to OUT/adapter); --no-merge keeps only the adapter")

    def __post_init__(self) -> None:
        if self.student is None and self.teacher is not None:
            raise ConfigError("DistillConfig needs student with a teacher (without both, the embedded organism is "
                              "distilled: it brings its own pair)")
        if self.student is not None and self.teacher is None:
            raise ConfigError("DistillConfig needs teacher with a student (a text LLM with the student's tokenizer)")
        self.out = Path(self.out)
        active = self.active_channels()
        if any(v is not None and v < 1 for v in (self.batch_size, self.grad_accum, self.epochs)):
            raise ConfigError("batch_size, grad_accum and epochs must be at least 1")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        if self.topk < 0:
            raise ConfigError("topk must be >= 0 (0 = full teacher distribution on the fly)")
        if self.train_projector and not set(active) & set(AUDIO_CHANNELS):
            raise ConfigError("--train-projector needs an audio channel: the projector only sees audio")
        self.layers()
        if self.targets not in ("dataset", "teacher", None):
            raise ConfigError(f"targets must be 'dataset' or 'teacher', got {self.targets!r}")
        if isinstance(self.gradient_checkpointing, bool):  # the Python API's (and older manifests') on/off
            self.gradient_checkpointing = "on" if self.gradient_checkpointing else "off"
        if self.gradient_checkpointing not in ("auto", "on", "off"):
            raise ConfigError(f"gradient_checkpointing must be auto, on or off, got {self.gradient_checkpointing!r}")
        if not self.audio_cache_gib >= 0:
            raise ConfigError(f"audio_cache_gib must be >= 0, got {self.audio_cache_gib}")
        if self.report_to not in ("none", "tensorboard", "wandb"):
            raise ConfigError(f"report_to must be none, tensorboard or wandb, got {self.report_to!r}")
        if self.kind not in ("forward_kl", "reverse_kl", "jsd"):
            raise ConfigError(f"kind must be forward_kl, reverse_kl or jsd, got {self.kind!r}")

    @property
    def effective_topk_tail(self) -> str:
        """``topk_tail``, with ``sampled`` (a forward-KL estimator) falling back to ``bucket`` for other divergences."""
        return "bucket" if self.topk_tail == "sampled" and self.kind != "forward_kl" else self.topk_tail

    def checkpointing_on(self, device: Any) -> bool:
        """Whether gradient checkpointing runs on ``device`` (a ``torch.device`` or its type name): ``auto`` means on
        a CUDA GPU only."""
        if self.gradient_checkpointing == "auto":
            return (device if isinstance(device, str) else device.type).split(":")[0] == "cuda"
        return self.gradient_checkpointing == "on"

    def active_channels(self) -> tuple[str, ...]:
        parts = tuple(p.strip() for p in self.channels.split(",") if p.strip())
        if not parts or set(parts) - set(CHANNELS) or len(set(parts)) != len(parts):
            raise ConfigError(f"channels must be a comma-separated subset of {', '.join(CHANNELS)}, "
                              f"got {self.channels!r}")
        return tuple(c for c in CHANNELS if c in parts)

    def layers(self) -> tuple[int, ...]:
        try:
            return tuple(int(p) for p in self.align_layers.split(",") if p.strip())
        except ValueError:
            raise ConfigError(f"align_layers must be integers, comma-separated; got {self.align_layers!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}

    @property
    def resolved(self) -> bool:
        """True once every field has its value (:func:`resolve_distill_config`)."""
        return self.student is not None and all(getattr(self, k) is not None for k in STANDARD_DEFAULTS)


def resolve_distill_config(config: DistillConfig, *also: Any) -> DistillConfig:
    """Fill the fields left ``None``: the embedded organism's values (on ``config`` and on any ``also`` configs, e.g.
    the before/after evaluation's) when no student is given, then :data:`STANDARD_DEFAULTS`. Idempotent."""
    from speechlm_eval.embedded import apply_embedded, distill_defaults

    if config.student is None:
        defaults = distill_defaults()
        for target in (config, *also):
            apply_embedded(target, defaults)
    for name, value in STANDARD_DEFAULTS.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    return config


def our_reading_for(config: DistillConfig) -> dict[str, str]:
    """The settings the paper leaves open, as *this* run used them (a resolved config): what the manifest and the
    report state, so they never describe defaults the run overrode. :data:`OUR_READING` holds the plain defaults."""
    lora = (f"LoRA r={config.lora_r}, α={config.lora_alpha}, dropout {config.lora_dropout} on "
            f"{config.lora_targets or 'the family default modules (language model attention)'}" if config.lora
            else "full fine-tune of the language model")
    frozen = "audio encoder frozen, projector trained" if config.train_projector else "audio encoder and projector frozen"
    tails = {"sampled": f"its exact tempered tail mass and {config.tail_samples} ids sampled from the tail",
             "bucket": "the tail mass as one rest class", "renormalize": "renormalised over the top-k (no tail)"}
    teacher = (f"cached as its top-{config.topk} log-probs per response token, {tails[config.effective_topk_tail]}"
               if config.topk > 0 else "full vocabulary on the fly (no cache)")
    targets = "the dataset's response" if config.targets == "dataset" else "the teacher's own greedy reply"
    filters = {"max_words": config.max_words, "max_chars": config.max_chars,
               "max_response_words": config.max_response_words}
    return {
        "loss": f"{config.kind} per response token at temperature {config.temperature:g}, scaled by τ², averaged over "
                "the response tokens of the batch (paper: 'KL divergence with temperature scaling'; direction, τ and "
                "reduction ours)",
        "weights": f"λ_TT = {config.lambda_tt:g}, λ_ST = {config.lambda_st:g}, CE weight {config.ce:g}",
        "teacher": teacher,
        "targets": f"{targets}, cut to {config.max_response_tokens} tokens, end-of-turn token appended",
        "prompts": "the system prompt stays text in both channels; only the question is spoken (S→T)",
        "trained": f"{lora}; {frozen}",
        "optimizer": f"AdamW lr {config.lr:g}, weight decay {config.weight_decay:g}, {config.warmup_ratio:.0%} linear "
                     f"warmup then cosine decay, {config.epochs} epoch(s), batch {config.batch_size} x "
                     f"{config.grad_accum} micro-batch(es), gradient clipping at norm {config.max_grad_norm:g}",
        "precision": "bf16 weights and autocast on GPU, fp32 on CPU" if config.dtype == "auto" else config.dtype,
        "data": f"{config.max_examples or 'all'} rows read before filtering; speakable filter "
                + json.dumps(filters, sort_keys=True),
        "speech": f"{config.tts_engine}, voice {config.tts_voice}, {config.tts_rate} words per minute; clips longer "
                  "than the student's audio window dropped",
    }


def config_fields() -> list[Any]:
    """The ``DistillConfig`` fields with their help text, for the command line."""
    return list(fields(DistillConfig))


DEFAULT_EVAL_SUITE = "bundled"


@dataclass
class EvalConfig:
    """The before/after evaluation of a distillation (``speechlm-eval distill`` options)."""

    suites: list[str] = field(default_factory=list, metadata={
        "help": "evaluation suite(s) for the before/after gap runs, repeatable, as `gap --suite` (default: "
                f"{DEFAULT_EVAL_SUITE}; embedded organism: its suite)", "flag": "--suite"})
    eval_limit: int | None = field(default=None, metadata={"help": "first N items per subset", "min": 1})
    eval_batch_size: int = field(default=8, metadata={"help": "gap batch size", "min": 1})
    eval_max_new_tokens: int | None = field(default=None, metadata={
        "help": "gap new-token budget (default: gap's; embedded organism: 8)", "min": 1})
    eval_device: str = field(default="auto", metadata={"help": "device for the gap runs"})
    notes: list[str] = field(default_factory=list, metadata={"help": "notes for both reports", "cli": False})


# Fields that may change between a run and its --resume without changing what is trained.
# Gradient checkpointing recomputes the same activations (dropout's RNG state is replayed) and the audio encoder cache
# holds the same outputs: memory and time, not results.
_RESUMABLE_CHANGES = {"out", "resume", "overwrite", "threads", "save_every", "save_every_minutes", "keep_states",
                      "stop_after_steps", "merge", "gradient_checkpointing", "report_to", "cache_audio_encoder",
                      "audio_cache_gib", "teacher_batch_size", "leakage_suite", "leakage_data_dir"}


