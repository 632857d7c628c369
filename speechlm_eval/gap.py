"""``speechlm-eval gap`` as a library call, the composition root of an evaluation: load the suite, load the models,
run the arms, write records, run the diagnostics, judge, report.

Configuration problems (unknown subset, missing data, bad model path, incompatible resume) stop before any model
weights are loaded; per-item problems become error records and the run goes on.
"""

from __future__ import annotations

import json
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
    ItemRow,
    Manifest,
    RunDir,
    RunDirError,
    package_versions,
    portable_path,
)

DEFAULT_SUITE = "bundled"
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
    batch_size: int = _opt(8, "Prompts per generate call (padded left, sorted by length).", min=1)
    max_new_tokens: int | None = _opt(None, f"New-token budget per answer (default {DEFAULT_MAX_NEW_TOKENS}; "
                                      "8 for the embedded organism).", min=1)
    device: str = _opt("auto", "auto | cpu | cuda | cuda:N. auto = this process's device under torchrun/accelerate, "
                       "else CUDA if present, else CPU.")
    dtype: str = _opt("auto", "auto | float32 | bfloat16 | float16. auto = checkpoint dtype on GPU, float32 on CPU.")
    seed: int = _opt(0, "Seed for sampling, scoring fallbacks and bootstrap resampling.")
    model_family: str | None = _opt(None, "Force the speech LLM's family (default: from its config).")
    text_model_family: str | None = _opt(None, "Force the text LLM's family (default: from its config).")
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
    n_resamples: int = _opt(10_000, "Bootstrap resamples of every confidence interval.", min=1)
    notes: list[str] = _opt([], "Notes written into the manifest and the report.", cli=False)


def resolve_defaults(config: GapConfig) -> GapConfig:
    """Fill in the embedded default (models, suite, token budget) and the plain defaults where the user gave none."""
    if config.model is None:
        if config.text_model is not None:
            raise ConfigError("--text-model needs --model (the embedded default brings its own pair)")
        apply_embedded(config, gap_defaults())
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
    if config.batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    return config


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
        {"preset": config.preset} if config.preset != "none" else {})


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
    run_arms(config, items, models, audio_source, console, system)
    state.wait_for_everyone()
    if state.is_main_process:
        run.merge(config.arms, order)
    state.wait_for_everyone()
    if config.diagnostics:
        run_diagnostics(config, items, models, audio_source, system)
        state.wait_for_everyone()
    if state.is_main_process:
        from speechlm_eval.judge.run import judge_run
        from speechlm_eval.report.build import build_report

        run.merge([DIAGNOSTICS, PERCEPTION], order)
        if config.lm_eval_tasks:
            from speechlm_eval.lmeval.run import run_lmeval_tasks

            run_lmeval_tasks(models["speech_llm"], models["text_llm"], list(config.lm_eval_tasks),
                             config.lm_eval_include, run.path, limit=config.limit, batch_size=config.batch_size,
                             seed=config.seed, spoken=True, tts=tts,
                             apply_chat_template=config.lm_eval_apply_chat_template,
                             num_fewshot=config.lm_eval_num_fewshot, gen_kwargs=config.lm_eval_gen_kwargs)
        judge_run(run.path, config.judge, seed=config.seed, device=config.device, dtype=config.dtype)
        results = build_report(run.path)
    state.wait_for_everyone()
    if state.is_main_process:
        from speechlm_eval.report.build import check_run_succeeded

        check_run_succeeded(run.path, results)  # an arm with no item scored is an error, not a "–"
    return run.path


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


def describe_portably(model: Any, run_dir: Path) -> dict[str, Any]:
    """A model's manifest identity with its local path written as :func:`portable_path` writes it."""
    description = dict(model.describe())
    if isinstance(description.get("id"), str):
        description["id"] = portable_path(description["id"], run_dir)
    return description


def run_diagnostics(config: GapConfig, items: list[Item], models: dict[str, Any], audio_source: Any,
                    system: str | None = None) -> None:
    """Judge-free diagnostics after the arms: per-token KL/JSD and the perception (transcription) probe."""
    from speechlm_eval.diagnostics import PROBE_INSTRUCTION, run_distribution_diagnostics, run_perception_probe

    out = Path(config.out)
    run_distribution_diagnostics(out, items, models["speech_llm"], models["text_llm"], audio_source,
                                 batch_size=config.batch_size, system=system)
    run_perception_probe(out, [i for i in items if i.has_text_equivalent], models["speech_llm"], audio_source,
                         instruction=config.probe_instruction or PROBE_INSTRUCTION, batch_size=config.batch_size,
                         max_new_tokens=min(256, 4 * int(config.max_new_tokens or 64)), system=system)


def load_models(config: GapConfig) -> dict[str, Any]:
    from speechlm_eval.models.registry import LoadOptions, detect_family, get_family

    def load(name: str, family: str | None, revision: str | None):
        options = LoadOptions(device=config.device, dtype=config.dtype, revision=revision,
                              trust_remote_code=config.trust_remote_code)
        chosen = get_family(family) if family else detect_family(name, options)
        return chosen, options

    speech_family, speech_options = load(config.model, config.model_family, config.model_revision)
    if not speech_family.accepts_audio and any(ARM_BY_NAME[a].audio for a in config.arms):
        raise ConfigError(f"--model {config.model} is a text-only checkpoint (family {speech_family.name}); "
                          "the speech arm needs a speech LLM (e.g. Qwen2-Audio)")
    text_family = text_options = None
    if config.text_model is not None:
        text_family, text_options = load(config.text_model, config.text_model_family, config.text_model_revision)
    # Both configs resolved: only now are weights loaded.
    return {
        "speech_llm": speech_family.load(config.model, speech_options),
        "text_llm": text_family.load(config.text_model, text_options) if text_family else None,
    }


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
             console: Any, system: str | None = None) -> None:
    """Each arm in turn, with its progress (:mod:`speechlm_eval.progress`) and a warning when items got errors."""
    import logging

    from speechlm_eval.distributed import process_state
    from speechlm_eval.runner import arms_for, run_arm

    plans = arms_for(items, models["speech_llm"], models["text_llm"], config.arms, system=system,
                     truncate_audio=config.preset == "voicebench")
    state = process_state()
    for plan in plans:
        stats = run_arm(plan, Path(config.out), generation=generation_config(config),
                        batch_size=config.batch_size, audio_source=audio_source)
        if stats.errors and state.is_main_process:
            logging.getLogger(__name__).warning("%s: %d item(s) got error records", plan.name, stats.errors)
