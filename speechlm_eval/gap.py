"""``speechlm-eval gap`` as a library call, the composition root of an evaluation: load the suite, load the models,
run the arms, write records, run the diagnostics, judge, report.

Configuration problems (unknown subset, missing data, bad model path, incompatible resume) stop before any model
weights are loaded; per-item problems become error records and the run goes on.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from speechlm_eval.data.item import Item
from speechlm_eval.embedded import apply_embedded, gap_defaults
from speechlm_eval.models.base import CHECKPOINT_DEFAULTS, DEFAULT_MAX_NEW_TOKENS, GenerationConfig
from speechlm_eval.rundir import (
    ARM_BY_NAME,
    ARMS,
    DIAGNOSTICS,
    PERCEPTION,
    PARITY,
    SPEECH_LLM_SPEECH,
    TEXT_LLM_TEXT,
    ItemRow,
    Manifest,
    RunDir,
    RunDirError,
    package_versions,
    portable_path,
)

DEFAULT_SUITE = "bundled"
DEFAULT_BATCH_SIZE = 8  # what a batch size still unresolved falls back to (a served model's diagnostics)
AUTO_BATCH_CAP = 64  # --batch-size auto on an accelerator: lm-eval's search halves from here
CPU_BATCH_CAP = 256  # --batch-size auto on CPU: fewer, larger batches mean fewer decode steps (each pays python
#                      and kernel-launch overhead); the memory estimate below keeps a large model lower
CPU_MEMORY_SHARE = 0.5  # of the memory available when the run starts, for the heaviest batch's estimate
CPU_SEQUENCE_BOUND = 1024  # prompt tokens (audio tokens included) the estimate assumes for every row
ROLE_NAMES = {"speech_llm": "speech LLM", "text_llm": "text LLM"}
AUDIO_ENCODINGS = {"float32": "FLOAT", "pcm16": "PCM_16"}  # --audio-encoding -> soundfile WAV subtype
NO_TEXT_MODEL_NOTE = (
    "No --text-model given: the text_llm_text arm was not run and forgetting is not measured. The speech "
    "LLM's own text path is not a reference for forgetting; pass its text backbone (e.g. "
    "Qwen/Qwen2.5-7B-Instruct for Qwen2.5-Omni; `speechlm-eval families` names them) to measure it."
)


class ConfigError(ValueError):
    """A run that cannot start as configured; raised before any model is loaded."""


def _opt(default: Any, help: str, **cli: Any) -> Any:  # noqa: A002 - "help" as on a command line
    """A config field with its command-line help (the CLI is generated from these fields)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **cli})
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class GapConfig:
    """Everything that determines a gap run; each field is also a ``speechlm-eval gap`` option.

    ``model=None`` selects the embedded default pair, suite and token budget (:mod:`speechlm_eval.embedded`).
    """

    model: str | None = _opt(None, "Speech LLM: hub id or local path. Omitted: the embedded model organism pair and "
                             "its suite.")
    text_model: str | None = _opt(None, "Text LLM (the speech LLM's text backbone/teacher): hub id or local path. "
                                  "Omitted: forgetting is not measured.")
    suites: list[str] = _opt([], "Benchmark subsets, repeatable: 'voicebench:mmsu,openbookqa', "
                             "'voicebench:sd-qa@usa', 'voicebench', 'mmau', 'bundled', 'organism:organism_mcq@seedN'. "
                             f"Default: {DEFAULT_SUITE} (the embedded organism's suite without --model).",
                             flag="--suite")
    out: Path = _opt(Path("runs/gap"), "Run directory (records, manifest, results, report).")
    resume: bool = _opt(False, "Continue a killed run in --out without recomputing any record.")
    overwrite: bool = _opt(False, "Delete an existing run in --out and start over.")
    limit: int | None = _opt(None, "Keep the first N items of each subset (smoke runs).", min=1)
    batch_size: str | None = _opt(None, "Prompts per in-process generate call (padded left, sorted by length), a "
                                  f"number or auto (default): on an accelerator the largest batch up to "
                                  f"{AUTO_BATCH_CAP} that fits in memory, as lm-eval's --batch_size auto; on CPU the "
                                  f"largest power of two up to {CPU_BATCH_CAP} whose estimated memory fits in half "
                                  "the memory available. The diagnostics batch alike. A served model gets "
                                  "--concurrency prompts per call.")
    max_new_tokens: int | None = _opt(None, f"New-token budget per answer (default {DEFAULT_MAX_NEW_TOKENS}; "
                                      "8 for the embedded organism).", min=1)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N. auto = this process's device under torchrun/accelerate, "
                       "else CUDA if present, else CPU.")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16. auto = checkpoint dtype on GPU, float32 on CPU.")
    attn_implementation: str | None = _opt(None, "Attention kernel of the in-process models, as transformers names it: "
                                           "sdpa, eager, flash_attention_2 (GPU, needs flash-attn), flex_attention. "
                                           "Default: transformers' choice (sdpa where the model supports it). The "
                                           "manifest records the one each model ran with.")
    seed: int = _opt(0, "Seed for sampling, scoring fallbacks and bootstrap resampling.")
    model_family: str | None = _opt(None, "Force the speech LLM's family (default: from its config).")
    text_model_family: str | None = _opt(None, "Force the text LLM's family (default: from its config).")
    base_url: list[str] = _opt([], "OpenAI-compatible endpoint serving --model (vllm serve, SGLang, transformers "
                               "serve, a provider), e.g. http://127.0.0.1:8000/v1: the speech LLM is asked over HTTP "
                               "(--model = the served model name) instead of loaded. Repeat or comma-separate for "
                               "replicas (each request goes to the least busy one).", comma=True)
    text_base_url: list[str] = _opt([], "OpenAI-compatible endpoint serving --text-model (as --base-url).",
                                    comma=True)
    api_key_env: str = _opt("OPENAI_API_KEY", "Environment variable holding the served endpoints' API key (unset: "
                            "none, fine for local servers). The key is never written anywhere.")
    audio_encoding: str = _opt("float32", "How a served speech LLM gets the audio: float32 (WAV, bit-exact: what the "
                               "in-process adapter hears) or pcm16 (16-bit WAV, half the upload; for providers that "
                               "take integer PCM only).")
    concurrency: int = _opt(32, "Requests in flight at once per served model (also its prompts per batch).", min=1)
    prices: list[str] = _opt([], "MODEL=INPUT/OUTPUT: USD per million prompt/completion tokens of a served model or "
                             "the openai judge (model name as sent), for the cost in the report; repeatable.",
                             flag="--price")
    local_model: str | None = _opt(None, "The served --model's checkpoint on this machine (path or hub id), loaded "
                                   "in-process for --parity-check and for what an endpoint cannot do (KL/JSD "
                                   "diagnostics, lm-eval log-likelihoods). Default: --model when it is a local path.")
    local_text_model: str | None = _opt(None, "The served --text-model's checkpoint on this machine (as "
                                        "--local-model).")
    parity_check: int | None = _opt(None, "Prompt parity of served models: answer the first K items of each served "
                                    "arm in-process too (--local-model), one prompt at a time, and report how many "
                                    "greedy answers are identical and the prompt token counts on each side.", min=1)
    model_revision: str | None = _opt(None, "Hub revision (commit/tag) of --model.")
    text_model_revision: str | None = _opt(None, "Hub revision (commit/tag) of --text-model.")
    trust_remote_code: bool = _opt(False, "Allow checkpoints' own Python code (only for sources you trust).")
    data_dir: str | None = _opt(None, "Local VoiceBench copy (save_to_disk or the hub's parquet snapshot) instead of "
                                "the HF hub.")
    voicebench_revision: str | None = _opt(None, "HF dataset revision of hlt-lab/voicebench (default: the hub's "
                                           "current main; nothing is pinned, and the manifest says so).")
    mmau_json: str | None = _opt(None, "MMAU mmau-test-mini.json (its sha256 is recorded).")
    mmau_audio_dir: str | None = _opt(None, "Folder of MMAU test-mini <id>.wav clips.")
    tts_engine: str = _opt("espeak-ng", "TTS engine for items that have text but no audio.")
    tts_voice: str = _opt("en-us", "TTS voice.")
    tts_rate: int = _opt(160, "TTS speaking rate (words per minute).")
    arms: list[str] = _opt([], f"Run only these arms (repeatable): {', '.join(ARMS)}. Default: all.", flag="--arm")
    judge: str = _opt("none", "LLM judge for the open-ended subsets and sd-qa: openai:MODEL (any OpenAI-compatible "
                      "endpoint; base URL from $SPEECHLM_EVAL_JUDGE_BASE_URL, key from $OPENAI_API_KEY; VoiceBench "
                      "uses openai:gpt-4o-mini), hf:PATH (a local model), or none (those subsets are left unscored, "
                      "with a note). Calls are cached on disk.")
    diagnostics: bool = _opt(True, "Judge-free diagnostics after the arms: per-token KL/JSD speech vs text and text "
                             "LLM vs speech LLM, and the perception (transcription + WER) probe.")
    lm_eval_tasks: list[str] = _opt([], "lm-eval tasks (repeatable or comma-separated): forgetting per task on both "
                                    "models' text paths; multiple_choice tasks are also scored by log-likelihood "
                                    "given the spoken vs typed question (inequivalence).", comma=True)
    lm_eval_include: str | None = _opt(None, "Folder of local lm-eval task YAMLs (offline use; only local tasks are "
                                       "indexed when all named tasks are found there).")
    lm_eval_apply_chat_template: bool = _opt(False, "lm-eval's --apply_chat_template for the two text arms of "
                                             "--lm-eval-tasks (default: lm-eval's raw prompt, as --model hf).")
    lm_eval_num_fewshot: int | None = _opt(None, "lm-eval's --num_fewshot for --lm-eval-tasks (default: each "
                                           "task's own).", min=0)
    lm_eval_gen_kwargs: str | None = _opt(None, "lm-eval's --gen_kwargs for the generation tasks of "
                                          "--lm-eval-tasks, e.g. 'max_gen_toks=64'.")
    probe_instruction: str | None = _opt(None, "Instruction sent with the audio for the perception probe (default: "
                                         "'Transcribe the speech in the audio exactly.').")
    system_prompt: str | None = _opt(None, "System turn of every prompt, the same for both models: TEXT, or 'none' "
                                     "(no system message; each chat template's own default applies). Default: the "
                                     "speech LLM's chat-template default, sent explicitly to both models.")
    gen_kwargs: str | None = _opt(None, "Extra generation arguments as k=v,k2=v2 (lm-eval's syntax; values parsed as "
                                  "JSON where they can be), e.g. repetition_penalty=1.1. Nothing from a checkpoint's "
                                  "generation_config.json applies unless asked: greedy means greedy.")
    preset: Literal["none", "voicebench"] = _opt("none", "voicebench: decode as VoiceBench's wrapper for the "
                                                 "family does (its length budget, the checkpoint's generation config; "
                                                 "clips longer than the encoder window truncated and flagged per "
                                                 "record instead of refused).")
    threads: int | None = _opt(None, "torch threads per process. Default: 1 on CPU for models under 100 M parameters "
                               "(faster, and reruns match bit for bit), torch's default otherwise.", min=1)
    cache_audio_encoder: bool = _opt(True, "Encode each clip once per run: the speech LLM's log-mel features and audio "
                                     "encoder outputs are kept per clip (in CPU memory, up to --audio-cache-gib) and "
                                     "reused by the speech arm, the KL/JSD pass and the perception probe instead of "
                                     "computing them three times. Records are the same either way (byte-identical "
                                     "on CPU). Applies to in-process families with an audio encoder; off by itself "
                                     "elsewhere, and where nothing would read it (--no-diagnostics, or the passes run "
                                     "on the speech arm's prompts: --reuse-prompt-cache).")
    reuse_prompt_cache: bool = _opt(True, "Run the KL/JSD pass and the perception probe on top of the speech arm's "
                                    "prompts: the speech LLM's cache of each batch's prompts (system turn and audio) "
                                    "is continued with the fixed response and with the probe's instruction instead "
                                    "of encoding the clip's audio tokens again. Transcripts are the same either way; "
                                    "KL/JSD values agree to float rounding. Applies to in-process families that "
                                    "support it (qwen2-audio, audioflamingo3, voxtral, qwen2.5-omni, qwen3-omni); "
                                    "the others run the passes separately.")
    audio_cache_gib: float = _opt(2.0, "Most CPU memory the audio cache holds (GiB; half for features, half for "
                                  "encoder outputs); clips past it are encoded each time they are used.", min=0.0)
    n_resamples: int = _opt(10_000, "Bootstrap resamples of every confidence interval.", min=1)
    notes: list[str] = _opt([], "Notes written into the manifest and the report.", cli=False)


def resolve_defaults(config: GapConfig) -> GapConfig:
    """Fill in the embedded default (models, suite, token budget) and the plain defaults where the user gave none."""
    if config.model is None:
        if config.text_model is not None:
            raise ConfigError("--text-model needs --model (the embedded default brings its own pair)")
        if config.base_url:
            raise ConfigError("--base-url needs --model: the name the endpoint serves the speech LLM under")
        apply_embedded(config, gap_defaults())
    if config.text_base_url and config.text_model is None:
        raise ConfigError("--text-base-url needs --text-model: the name the endpoint serves the text LLM under")
    config.suites = list(config.suites) or [DEFAULT_SUITE]
    config.arms = list(config.arms) or list(ARMS)
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; arms are {list(ARMS)}")
    if config.max_new_tokens is None:
        config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    if config.text_model is None:
        config.arms = [a for a in config.arms if ARM_BY_NAME[a].model != "text_llm"]
        config.notes.append(NO_TEXT_MODEL_NOTE)
    config.batch_size = parse_batch_size(config.batch_size)
    resolve_served(config)
    return config


def parse_batch_size(value: Any) -> int | str:
    """``--batch-size``: a positive number, or ``"auto"`` (also when not given; resolved once the models are loaded,
    by :func:`resolve_batch_size`)."""
    if value is None or str(value).strip().lower() == "auto":
        return "auto"
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--batch-size must be a number or auto, got {value!r}") from None
    if size < 1:
        raise ConfigError("--batch-size must be at least 1")
    return size


def resolve_batch_size(config: GapConfig, models: dict[str, Any], items: Sequence[Item], audio_source: Any) -> int:
    """The batch size of an ``auto`` run.

    On an accelerator: the largest power of two up to :data:`AUTO_BATCH_CAP` whose heaviest batch (the longest
    prompts, audio included, plus the whole new-token budget) runs one forward pass without running out of memory
    (lm-eval's search, halving from the cap). On CPU, where running out of memory kills the process instead of
    raising: :func:`cpu_batch_size`, from each model's config, without a trial."""
    if config.batch_size != "auto":
        return int(config.batch_size)
    loaded = [m for m in models.values() if m is not None and hasattr(m, "model")]
    devices = {next(m.model.parameters()).device.type for m in loaded}
    if not loaded:
        return AUTO_BATCH_CAP
    if devices == {"cpu"}:
        import psutil

        budget = CPU_MEMORY_SHARE * psutil.virtual_memory().available
        return min(cpu_batch_size(m.model, int(config.max_new_tokens or 1), budget) for m in loaded)
    from speechlm_eval.runner import largest_fitting_batch

    return min(largest_fitting_batch(model, items, audio_source, AUTO_BATCH_CAP, int(config.max_new_tokens or 1),
                                     with_audio=bool(getattr(model, "accepts_audio", False))) for model in loaded)


def bytes_per_row_token(model: Any) -> int:
    """Estimated memory one token of one batch row holds at the peak of a forward pass, from the model's config: its
    key/value cache in every layer (model dtype), one layer's float32 intermediates (attention projections and the
    MLP), and a float32 logit row (an upper bound: generation and the KL pass project only the positions they need).
    Per-layer sizes (Gemma 3n's list of MLP widths) count at their largest."""
    text = model.config.get_text_config()

    def size(name: str, default: int) -> int:
        value = getattr(text, name, None)
        if isinstance(value, (list, tuple)):
            value = max(value, default=None)
        return int(value) if value else default

    hidden = size("hidden_size", 0)
    heads = size("num_attention_heads", 1)
    kv_heads = size("num_key_value_heads", heads)
    head_dim = size("head_dim", hidden // heads)
    ffn = max(size("intermediate_size", 4 * hidden), size("moe_intermediate_size", 0))
    element = next(model.parameters()).element_size()
    kv_cache = 2 * size("num_hidden_layers", 1) * kv_heads * head_dim * element
    layer = 4 * (4 * hidden + 3 * ffn)
    return kv_cache + layer + 4 * size("vocab_size", 0)


def cpu_batch_size(model: Any, new_tokens: int, budget_bytes: float) -> int:
    """The largest power of two up to :data:`CPU_BATCH_CAP` whose rows of :data:`CPU_SEQUENCE_BOUND` prompt tokens
    plus ``new_tokens`` fit in ``budget_bytes`` by :func:`bytes_per_row_token`; at least 1."""
    per_row = (CPU_SEQUENCE_BOUND + new_tokens) * bytes_per_row_token(model)
    size = CPU_BATCH_CAP
    while size > 1 and size * per_row > budget_bytes:
        size //= 2
    return size


def is_served(config: GapConfig, role: str) -> bool:
    """Whether ``role`` ("speech_llm" / "text_llm") is asked through an endpoint rather than loaded."""
    return bool(config.base_url if role == "speech_llm" else config.text_base_url)


def local_checkpoint(config: GapConfig, role: str) -> str | None:
    """The in-process checkpoint of a served model: ``--local-model``/``--local-text-model``, else the served name
    when it is a local directory (``transformers serve PATH`` serves a checkpoint under its path)."""
    given = config.local_model if role == "speech_llm" else config.local_text_model
    name = config.model if role == "speech_llm" else config.text_model
    if given is not None:
        return given
    return name if name is not None and Path(name).expanduser().is_dir() else None


def resolve_served(config: GapConfig) -> None:
    """Check what served models can do as configured, before anything loads; note in the report what they cannot."""
    from speechlm_eval.endpoint import api_base_url, parse_prices

    try:
        parse_prices(config.prices)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if (config.base_url or config.text_base_url) and config.preset != "none":
        raise ConfigError(f"--preset {config.preset} makes in-process decoding follow a checkpoint's generation "
                          "config; a served model decodes by its server's settings (start the server with the ones you "
                          "want); leave --preset off with --base-url / --text-base-url")
    if config.audio_encoding not in AUDIO_ENCODINGS:
        raise ConfigError(f"--audio-encoding must be one of {', '.join(AUDIO_ENCODINGS)}, got {config.audio_encoding!r}")
    for flag, urls in (("--base-url", config.base_url), ("--text-base-url", config.text_base_url)):
        for url in urls:
            try:
                api_base_url(url)
            except ValueError as error:
                raise ConfigError(f"{flag}: {error}") from None
    served = [role for role in ("speech_llm", "text_llm") if is_served(config, role)
              and any(ARM_BY_NAME[a].model == role for a in config.arms)]
    if config.parity_check is not None and not served:
        raise ConfigError("--parity-check compares a served model with its in-process checkpoint; it needs "
                          "--base-url or --text-base-url")
    without_local = [role for role in served if local_checkpoint(config, role) is None]
    flags = {"speech_llm": "--local-model", "text_llm": "--local-text-model"}
    if without_local and (config.parity_check is not None or config.lm_eval_tasks):
        need = "--parity-check" if config.parity_check is not None else "--lm-eval-tasks"
        raise ConfigError(f"{need} needs the served model's checkpoint in this process: pass "
                          f"{' and '.join(flags[r] for r in without_local)} PATH")
    if served:
        config.notes.append(served_note(config, served, without_local))


def served_note(config: GapConfig, served: list[str], without_local: list[str]) -> str:
    """What the report must say about served models: where the answers came from, and what could not run."""
    from speechlm_eval.endpoint import public_url

    def where(role: str) -> str:
        name = config.model if role == "speech_llm" else config.text_model
        urls = config.base_url if role == "speech_llm" else config.text_base_url
        return f"{ROLE_NAMES[role]} `{portable_path(name, config.out)}` at {', '.join(public_url(u) for u in urls)}"

    note = (f"Served: {'; '.join(where(r) for r in served)}. Answers come from an OpenAI-compatible endpoint "
            "(temperature 0 sent explicitly; the same prompts and token budget as in-process); the perception probe "
            "(generation) runs through it too.")
    if "speech_llm" in without_local:
        if config.diagnostics:
            note += (" Distribution diagnostics (per-token KL/JSD) not run: a served model exposes no logits.")
        note += (" Spoken log-likelihood multiple choice (lm-eval) is not available either: a chat endpoint cannot "
                 "score a given continuation.")
    elif "text_llm" in without_local and config.diagnostics:
        note += (" KL/JSD between text LLM and speech LLM not run: the served text LLM exposes no logits (the "
                 "speech LLM's text-vs-speech divergence ran, on the text LLM's answers).")
    if without_local:
        flags = " / ".join("--local-model" if r == "speech_llm" else "--local-text-model" for r in without_local)
        note += f" Pass {flags} PATH to run them in-process on the same checkpoint."
    elif config.diagnostics:
        note += " Logit-based diagnostics ran in-process on the served models' local checkpoints."
    return note


def load_items(config: GapConfig) -> tuple[list[Item], list[dict[str, Any]]]:
    from speechlm_eval.data.suite import load_suite, parse_suite

    requests = [r for spec in config.suites for r in parse_suite(spec)]
    return load_suite(
        requests,
        data_dir=config.data_dir,
        revision=config.voicebench_revision,
        mmau_json=config.mmau_json,
        mmau_audio_dir=config.mmau_audio_dir,
        limit=config.limit,
    )


def item_row(item: Item) -> ItemRow:
    """What scoring and reports need of an item (no audio), one line of ``items.jsonl``."""
    from speechlm_eval.data.registry import scorer_for_subset

    return ItemRow.from_item(item, scorer=scorer_for_subset(item.subset))


def generation_config(config: GapConfig) -> GenerationConfig:
    extra = {**preset_generation(config.preset), **parse_gen_kwargs(config.gen_kwargs)}
    return GenerationConfig(max_new_tokens=int(config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS), seed=config.seed,
                            extra=tuple(sorted(extra.items())))


# VoiceBench's wrappers pass no decoding settings but a length: the checkpoint's generation config decides the rest,
# and Qwen2-Audio's caps prompt plus answer at 2048 tokens (``max_length``, not ``max_new_tokens``).
PRESETS: dict[str, dict[str, Any]] = {
    "none": {},
    "voicebench": {"max_length": 2048, CHECKPOINT_DEFAULTS: True},
}


def preset_generation(preset: str) -> dict[str, Any]:
    try:
        return dict(PRESETS[preset])
    except KeyError:
        raise ConfigError(f"unknown --preset {preset!r}; presets are {', '.join(PRESETS)}") from None


def parse_gen_kwargs(spec: str | None) -> dict[str, Any]:
    """``k=v,k2=v2`` (lm-eval's ``--gen_kwargs``) as a dict; each value JSON-parsed when it parses (numbers, bools)."""
    out: dict[str, Any] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, sep, raw = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--gen-kwargs: {part!r} is not KEY=VALUE")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def system_prompt_for(config: GapConfig, speech_llm: Any) -> tuple[str | None, dict[str, Any]]:
    """The system turn every prompt carries, and its manifest entry (policy, text, where it came from)."""
    if config.system_prompt is None and getattr(speech_llm, "family", None) == "served":
        # A chat template's default is not observable through the API; sending none lets each template add its own
        # (the same text for a speech LLM and its backbone's template in the Qwen families).
        return None, {"policy": "served speech LLM: no system message sent, each chat template's own default applies "
                                "(--system-prompt TEXT sends one to both models)", "text": None}
    if config.system_prompt is None:
        default = getattr(speech_llm, "default_system_prompt", lambda: None)()
        return default, {"policy": "speech LLM's template default, sent to both models", "text": default}
    if config.system_prompt.strip().lower() == "none":
        return None, {"policy": "none: no system message (each chat template's own default applies)", "text": None}
    return config.system_prompt, {"policy": "--system-prompt, sent to both models", "text": config.system_prompt}


def request_identity(config: GapConfig, items_sha256: str) -> dict[str, Any]:
    """The part of the configuration a resumed run must share with the run it continues."""
    out = Path(config.out)
    return {
        "model": portable_path(config.model, out),
        "model_revision": config.model_revision,
        "model_family": config.model_family,
        "text_model": portable_path(config.text_model, out),
        "text_model_revision": config.text_model_revision,
        "text_model_family": config.text_model_family,
        "suites": list(config.suites),
        "limit": config.limit,
        "items_sha256": items_sha256,
        "arms": list(config.arms),
        "generation": generation_config(config).to_dict(),
        "tts": {"engine": config.tts_engine, "voice": config.tts_voice, "rate": config.tts_rate},
        "seed": config.seed,
        "diagnostics": config.diagnostics,
        "probe_instruction": config.probe_instruction,
    } | ({"lm_eval_tasks": list(config.lm_eval_tasks), "lm_eval_options": {
        "apply_chat_template": config.lm_eval_apply_chat_template, "num_fewshot": config.lm_eval_num_fewshot,
        "gen_kwargs": config.lm_eval_gen_kwargs}} if config.lm_eval_tasks else {}) | (
        {"system_prompt": config.system_prompt} if config.system_prompt is not None else {}) | (
        {"attn_implementation": config.attn_implementation} if config.attn_implementation else {}) | (
        {"preset": config.preset} if config.preset != "none" else {}) | served_identity(config)


def served_identity(config: GapConfig) -> dict[str, Any]:
    """Which models answer through an endpoint (in the request only when some do, so in-process runs keep theirs).

    The URL is left out: a server restarted on another port may continue the run it started.
    """
    served = {role: True for role in ("speech_llm", "text_llm") if is_served(config, role)}
    if not served:
        return {}
    # The encoding changes what a served speech LLM hears (pcm16 rounds the samples).
    return {"served": served, **({"audio_encoding": config.audio_encoding} if "speech_llm" in served else {})}


def run_gap(config: GapConfig, *, console: Any = None) -> Path:
    """Run (or resume) a gap run; returns the run directory holding records, manifest and results."""
    from speechlm_eval.distributed import process_state, set_threads
    from speechlm_eval.rundir import items_jsonl_sha256

    config = resolve_defaults(config)
    items, sources = load_items(config)  # DataError here: nothing loaded yet
    if not items:
        raise ConfigError("the suite selected no items")
    from speechlm_eval.preflight import check_gap

    check_gap(config, items)  # seed, paths, disk, TTS voice, lm-eval tasks, judge endpoint: before any model loads
    rows = [item_row(i) for i in items]
    identity = request_identity(config, items_jsonl_sha256(rows))
    state = process_state()
    run = RunDir(config.out)
    if state.is_main_process:
        try:
            run.prepare(identity, resume=config.resume, overwrite=config.overwrite)
        except RunDirError as error:
            raise ConfigError(str(error)) from None
    state.wait_for_everyone()

    models = load_models(config)
    threads = set_threads(config.threads, next(models["speech_llm"].model.parameters()).device
                          if hasattr(models["speech_llm"], "model") else "remote",
                          sum(m.describe().get("parameters", 0) or 0 for m in models.values() if m is not None))
    audio_source, tts = make_audio_source(config)
    config.batch_size = resolve_batch_size(config, models, items, audio_source)
    system, system_entry = system_prompt_for(config, models["speech_llm"])
    manifest = Manifest(
        request=identity,
        models={name: describe_portably(m, run.path) for name, m in models.items() if m is not None},
        data=sources,
        items={"n": len(items), "sha256": identity["items_sha256"],
               "speech_only": sum(not i.has_text_equivalent for i in items)},
        generation=generation_config(config).to_dict(),
        tts=tts.cache_key_fields(),
        batch_size=config.batch_size,
        world_size=state.num_processes,
        threads=threads,
        seed=config.seed,
        statistics={"n_resamples": config.n_resamples, "confidence": 0.95},
        packages=package_versions(),
        notes=list(config.notes),
        extra=pair_entries(config, models, system_entry),
    )
    if state.is_main_process:
        run.write_items(rows)
        run.write_manifest(manifest)
    state.wait_for_everyone()

    order = [i.id for i in items]
    local = LocalModels(config, models)
    usage = UsageLog(run, models, state.process_index)
    # The KL/JSD pass and the probe run on top of the speech arm's prompts where the family allows it; elsewhere
    # each clip's features and encoder outputs, computed in the speech arm, are kept for the two passes.
    fused = speech_arm_diagnostics(config, models, local, system)
    with audio_encoder_cache(config, models["speech_llm"], needed=config.diagnostics and fused is None) as cache:
        try:
            run_arms(config, items, models, audio_source, console, system, after_arm=usage.flush,
                     diagnostics=fused)
            state.wait_for_everyone()
            if state.is_main_process:
                run.merge(config.arms, order)
                if config.parity_check is not None:
                    run_parity(config, items, models, local, audio_source, system)
                    run.merge([PARITY], order)
            state.wait_for_everyone()
            if config.diagnostics:
                run_diagnostics(config, items, models, local, audio_source, system)
                state.wait_for_everyone()
        finally:  # what the endpoints were asked is counted even when the run stops half-way
            usage.flush()
        if cache is not None:
            logging.getLogger(__name__).info("audio encoder cache: %s", cache.stats.as_dict())
    if state.is_main_process:
        from speechlm_eval.endpoint import parse_prices
        from speechlm_eval.judge.run import judge_run
        from speechlm_eval.report.build import build_report

        run.merge([DIAGNOSTICS, PERCEPTION], order)
        if config.lm_eval_tasks:
            from speechlm_eval.lmeval.run import run_lmeval_tasks

            run_lmeval_tasks(local.get("speech_llm"), local.get("text_llm"), list(config.lm_eval_tasks),
                             config.lm_eval_include, run.path, limit=config.limit, batch_size=config.batch_size,
                             seed=config.seed, spoken=True, tts=tts,
                             apply_chat_template=config.lm_eval_apply_chat_template,
                             num_fewshot=config.lm_eval_num_fewshot, gen_kwargs=config.lm_eval_gen_kwargs)
        judge_run(run.path, config.judge, seed=config.seed, device=config.device, dtype=config.dtype,
                  prices=parse_prices(config.prices))
        results = build_report(run.path)
    state.wait_for_everyone()
    if state.is_main_process:
        from speechlm_eval.report.build import check_run_succeeded

        check_run_succeeded(run.path, results)  # an arm with no item scored is an error, not a "–"
    return run.path


def audio_encoder_cache(config: GapConfig, model: Any, needed: bool = True) -> Any:
    """The context in which ``model``'s audio encoder outputs are cached per clip (``--cache-audio-encoder``): a
    :func:`~speechlm_eval.models.encoder_cache.cached_audio_encoder`, which does nothing where it cannot apply.

    ``needed``: whether anything would read the cache (the separate KL/JSD pass and probe); when not (diagnostics
    off, or run on top of the speech arm's prompts), none is kept, so the run's memory does not grow with clips."""
    import contextlib

    if not needed or not config.cache_audio_encoder or is_served(config, "speech_llm"):
        return contextlib.nullcontext()
    from speechlm_eval.models.encoder_cache import cached_audio_encoder

    return cached_audio_encoder(model, int(config.audio_cache_gib * 2**30))


def pair_entries(config: GapConfig, models: dict[str, Any], system_entry: dict[str, Any]) -> dict[str, Any]:
    """Manifest entries about the pair: the system-prompt policy, each arm's effective decoding settings, and whether
    the text LLM is the speech LLM's backbone or a proxy."""
    from speechlm_eval.rundir import ARM_BY_NAME

    generation = generation_config(config)
    effective = {}
    for arm in config.arms:
        model = models[ARM_BY_NAME[arm].model]
        settings = getattr(model, "generation_settings", None)
        effective[arm] = settings(generation) if settings else generation.to_dict()
    entries: dict[str, Any] = {"system_prompt": system_entry, "generation_effective": effective}
    if models["text_llm"] is not None and hasattr(models["speech_llm"], "language_model") \
            and hasattr(models["text_llm"], "language_model"):
        from speechlm_eval.backbone import backbone_identity

        entries["text_llm_reference"] = backbone_identity(models["speech_llm"], models["text_llm"])
    return entries


class LocalModels:
    """The in-process model of each role, for what needs logits or a checkpoint: the model itself when it was
    loaded, the served model's local checkpoint (loaded on first use, once) when it is served, else ``None``."""

    def __init__(self, config: GapConfig, models: dict[str, Any]) -> None:
        self.config, self.models = config, models
        self._loaded: dict[str, Any] = {}

    def get(self, role: str) -> Any:
        model = self.models.get(role)
        if model is None or not is_served(self.config, role):
            return model
        if role not in self._loaded:
            path = local_checkpoint(self.config, role)
            self._loaded[role] = None if path is None else load_checkpoint(self.config, role, path)
        return self._loaded[role]

    def available(self, role: str) -> bool:
        """Whether :meth:`get` gives a model, without loading one."""
        if self.models.get(role) is None:
            return False
        return not is_served(self.config, role) or local_checkpoint(self.config, role) is not None


class UsageLog:
    """Appends what each served model was asked since the last flush to the run's usage log (one line per model).

    Flushed after every arm and at the end, so a killed run keeps the usage of the arms it finished; lines are
    deltas, so the report's sums count every request once.
    """

    COUNTS = ("calls", "attempts", "failed", "prompt_tokens", "completion_tokens", "audio_prompt_tokens",
              "unreported")

    def __init__(self, run: RunDir, models: dict[str, Any], rank: int) -> None:
        self.run, self.models, self.rank = run, models, rank
        self._written: dict[str, dict[str, Any]] = {}

    def flush(self) -> None:
        rows = []
        for role, model in self.models.items():
            usage = getattr(model, "usage", None)
            if not callable(usage):
                continue
            now, before = usage(), self._written.get(role, {})
            delta = {k: now[k] - int(before.get(k, 0)) for k in self.COUNTS}
            if delta["attempts"]:
                price = getattr(model, "price", None)
                cost = price.cost(delta["prompt_tokens"], delta["completion_tokens"]) if price is not None else None
                rows.append({**now, **delta, "retries": max(0, delta["attempts"] - delta["calls"] - delta["failed"]),
                             "cost_usd": cost, "role": role, "rank": self.rank,
                             "model": portable_path(now["model"], self.run.path)})
                self._written[role] = now
        if rows:
            self.run.append_usage(rows)


def arm_batch_size(config: GapConfig, model: Any) -> int:
    """Prompts per generate call: a served model gets its concurrency (a smaller batch would leave the server idle
    between batches), an in-process one ``--batch-size``."""
    concurrency = getattr(model, "concurrency", None)
    return int(concurrency) if concurrency else int(config.batch_size or DEFAULT_BATCH_SIZE)


def run_parity(config: GapConfig, items: list[Item], models: dict[str, Any], local: LocalModels,
               audio_source: Any, system: str | None = None) -> None:
    """Answer the first ``--parity-check`` items of each served arm in-process too (records/parity.jsonl)."""
    from speechlm_eval.parity import ParityArm, run_parity_check

    arms = []
    for name in config.arms:
        arm = ARM_BY_NAME[name]
        if models.get(arm.model) is not None and is_served(config, arm.model):
            arms.append(ParityArm(name, local.get(arm.model), with_audio=arm.audio, system=system))
    run_parity_check(Path(config.out), items, arms, int(config.parity_check or 0), generation_config(config),
                     audio_source)


def describe_portably(model: Any, run_dir: Path) -> dict[str, Any]:
    """A model's manifest identity with its local path written as :func:`portable_path` writes it."""
    description = dict(model.describe())
    if isinstance(description.get("id"), str):
        description["id"] = portable_path(description["id"], run_dir)
    return description


def speech_arm_diagnostics(config: GapConfig, models: dict[str, Any], local: "LocalModels",
                           system: str | None) -> Any:
    """The diagnostics that run on top of the speech arm's prompts (``--reuse-prompt-cache``), or ``None`` where
    they cannot: diagnostics off, a served speech LLM, or a family whose prompt cache is not reused."""
    speech_llm = models["speech_llm"]
    if not (config.diagnostics and config.reuse_prompt_cache and SPEECH_LLM_SPEECH in config.arms
            and not is_served(config, "speech_llm") and getattr(speech_llm, "reuses_prompt_cache", False)):
        return None
    from speechlm_eval.diagnostics import PROBE_INSTRUCTION, SpeechArmDiagnostics

    text_llm = local.get("text_llm") if local.available("text_llm") else None
    reference = TEXT_LLM_TEXT if TEXT_LLM_TEXT in config.arms and models["text_llm"] is not None else None
    return SpeechArmDiagnostics(Path(config.out), speech_llm, text_llm, reference_arm=reference, system=system,
                                instruction=config.probe_instruction or PROBE_INSTRUCTION,
                                probe_max_new_tokens=probe_limit(config))


def probe_limit(config: GapConfig) -> int:
    """The perception probe's largest new-token budget: four times the arms', at most 256."""
    return min(256, 4 * int(config.max_new_tokens or 64))


def run_diagnostics(config: GapConfig, items: list[Item], models: dict[str, Any], local: LocalModels,
                    audio_source: Any, system: str | None = None) -> None:
    """Judge-free diagnostics after the arms: per-token KL/JSD and the perception (transcription) probe.

    KL/JSD need logits, so they run on in-process models only (a served model's local checkpoint when given); the
    probe is generation, so it asks the speech LLM wherever it answers.
    """
    from speechlm_eval.diagnostics import PROBE_INSTRUCTION, run_distribution_diagnostics, run_perception_probe

    out = Path(config.out)
    if local.available("speech_llm"):
        text_llm = local.get("text_llm") if local.available("text_llm") else None
        reference = TEXT_LLM_TEXT if TEXT_LLM_TEXT in config.arms and models["text_llm"] is not None else None
        run_distribution_diagnostics(out, items, local.get("speech_llm"), text_llm, audio_source,
                                     batch_size=int(config.batch_size or DEFAULT_BATCH_SIZE), system=system,
                                     reference_arm=reference)
    speech_llm = models["speech_llm"]
    run_perception_probe(out, [i for i in items if i.has_text_equivalent], speech_llm, audio_source,
                         instruction=config.probe_instruction or PROBE_INSTRUCTION,
                         batch_size=arm_batch_size(config, speech_llm),
                         max_new_tokens=probe_limit(config), system=system)


def load_models(config: GapConfig) -> dict[str, Any]:
    """The two models of a run: served ones (a base URL given: no checkpoint read, no family detected) and in-process
    ones (family from the checkpoint's config). Both configs are resolved before any weights load."""
    from speechlm_eval.models.registry import LoadOptions, detect_family, get_family

    def resolve(name: str, family: str | None, revision: str | None):
        options = LoadOptions(device=config.device, dtype=config.dtype, revision=revision,
                              trust_remote_code=config.trust_remote_code,
                              attn_implementation=config.attn_implementation)
        chosen = get_family(family) if family else detect_family(name, options)
        return chosen, options

    speech_family = speech_options = None
    if not is_served(config, "speech_llm"):
        speech_family, speech_options = resolve(config.model, config.model_family, config.model_revision)
        if not speech_family.accepts_audio and any(ARM_BY_NAME[a].audio for a in config.arms):
            raise ConfigError(f"--model {config.model} is a text-only checkpoint (family {speech_family.name}); "
                              "the speech arm needs a speech LLM (e.g. Qwen2-Audio)")
    text_family = text_options = None
    if config.text_model is not None and not is_served(config, "text_llm"):
        text_family, text_options = resolve(config.text_model, config.text_model_family, config.text_model_revision)
    # Both configs resolved: only now are weights loaded.
    speech = (served_model(config, "speech_llm") if speech_family is None
              else speech_family.load(config.model, speech_options))
    text = None
    if config.text_model is not None:
        text = (served_model(config, "text_llm") if text_family is None
                else text_family.load(config.text_model, text_options))
    return {"speech_llm": speech, "text_llm": text}


def served_model(config: GapConfig, role: str) -> Any:
    """The :class:`~speechlm_eval.models.served.ServedModel` of a role (nothing is sent until it generates)."""
    from speechlm_eval.endpoint import parse_prices
    from speechlm_eval.models.served import load_served

    name = config.model if role == "speech_llm" else config.text_model
    urls = config.base_url if role == "speech_llm" else config.text_base_url
    try:
        return load_served(str(name), list(urls), api_key_env=config.api_key_env, concurrency=config.concurrency,
                           accepts_audio=role == "speech_llm", price=parse_prices(config.prices).get(str(name)),
                           audio_subtype=AUDIO_ENCODINGS[config.audio_encoding])
    except ValueError as error:
        raise ConfigError(f"{'--base-url' if role == 'speech_llm' else '--text-base-url'}: {error}") from None


def load_checkpoint(config: GapConfig, role: str, path: str) -> Any:
    """A served model's local checkpoint, in-process (family from its config, as an in-process run loads it)."""
    from speechlm_eval.models.registry import LoadOptions, detect_family, get_family

    family = config.model_family if role == "speech_llm" else config.text_model_family
    revision = config.model_revision if role == "speech_llm" else config.text_model_revision
    options = LoadOptions(device=config.device, dtype=config.dtype, revision=revision,
                          trust_remote_code=config.trust_remote_code, attn_implementation=config.attn_implementation)
    return (get_family(family) if family else detect_family(path, options)).load(path, options)


def make_audio_source(config: GapConfig):
    """Audio for the speech arm: the item's own clip, decoded to 16 kHz, or cached TTS of its text."""
    from speechlm_eval.data.audio import decode_audio
    from speechlm_eval.speech import CachedTTS, get_tts

    tts = CachedTTS(get_tts(config.tts_engine, voice=config.tts_voice, rate=config.tts_rate))

    def audio_for(item: Item):
        if item.audio is not None:
            return decode_audio(item.audio, item_id=item.id)
        text = item.text_to_speak()
        if not text:
            raise ValueError(f"item {item.id} has neither audio nor text to synthesise")
        return tts.synthesize(text)

    return audio_for, tts


def run_arms(config: GapConfig, items: Sequence[Item], models: dict[str, Any], audio_source: Any,
             console: Any, system: str | None = None, after_arm: Any = None, diagnostics: Any = None) -> None:
    """Each arm in turn, with its progress (:mod:`speechlm_eval.progress`) and a warning when items got errors;
    ``after_arm`` (if given) runs after each arm; ``diagnostics`` (a
    :class:`~speechlm_eval.diagnostics.SpeechArmDiagnostics`, if given) answers the speech arm's batches."""
    import contextlib
    import logging

    from speechlm_eval.distributed import process_state
    from speechlm_eval.runner import arms_for, run_arm

    plans = arms_for(items, models["speech_llm"], models["text_llm"], config.arms, system=system,
                     truncate_audio=config.preset == "voicebench")
    state = process_state()
    for plan in plans:
        fused = diagnostics if diagnostics is not None and plan.name == SPEECH_LLM_SPEECH else None
        with fused if fused is not None else contextlib.nullcontext():
            stats = run_arm(plan, Path(config.out), generation=generation_config(config),
                            batch_size=arm_batch_size(config, plan.model), audio_source=audio_source,
                            answer=fused.answer if fused is not None else None)
        if stats.errors and state.is_main_process:
            logging.getLogger(__name__).warning("%s: %d item(s) got error records", plan.name, stats.errors)
        if after_arm is not None:
            after_arm()
