"""``speechlm-eval gap`` as a library call: load the suite, load the models, run the arms, write records and results.

Configuration problems (unknown subset, missing data, bad model path, incompatible resume) stop before any model
weights are loaded; per-item problems become error records and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

from speechlm_eval import __version__
from speechlm_eval.data.item import Item
from speechlm_eval.records import ARMS, write_json_atomic, write_text_atomic

MANIFEST_SCHEMA = "speechlm-eval/manifest/v1"
RECORDED_PACKAGES = ("torch", "transformers", "datasets", "accelerate", "numpy", "scipy", "soundfile", "soxr")


class ConfigError(ValueError):
    """A run that cannot start as configured; raised before any model is loaded."""


@dataclass
class GapConfig:
    """Everything that determines a gap run. ``model=None`` selects the embedded default pair and suite."""

    out: Path
    model: str | None = None
    text_model: str | None = None
    model_family: str | None = None
    text_model_family: str | None = None
    model_revision: str | None = None
    text_model_revision: str | None = None
    suites: Sequence[str] = ()
    data_dir: str | None = None
    voicebench_revision: str | None = None
    mmau_json: str | None = None
    mmau_audio_dir: str | None = None
    resume: bool = False
    overwrite: bool = False
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    trust_remote_code: bool = False
    tts_engine: str = "espeak-ng"
    tts_voice: str = "en-us"
    tts_rate: int = 160
    arms: Sequence[str] = ARMS
    judge: str = "none"
    diagnostics: bool = True
    lm_eval_tasks: Sequence[str] = ()
    lm_eval_include: str | None = None
    probe_instruction: str | None = None
    n_resamples: int = 10_000
    notes: list[str] = field(default_factory=list)


def resolve_defaults(config: GapConfig) -> GapConfig:
    """Fill in the embedded default (models, suite, token budget) where the user gave none."""
    from speechlm_eval import defaults

    if config.model is None:
        if config.text_model is not None:
            raise ConfigError("--text-model needs --model (the embedded default brings its own pair)")
        speech, text = defaults.embedded_models()
        config.model, config.text_model = str(speech), str(text)
        config.notes.append(defaults.EMBEDDED_NOTE)
        if config.max_new_tokens is None:
            config.max_new_tokens = defaults.EMBEDDED_MAX_NEW_TOKENS
    if not config.suites:
        config.suites = [defaults.EMBEDDED_SUITE]
    if config.max_new_tokens is None:
        config.max_new_tokens = 512
    if config.text_model is None:
        config.arms = [a for a in config.arms if a != "text_llm_text"]
        config.notes.append(
            "No --text-model given: the text_llm_text arm was not run and forgetting is not measured. The speech "
            "LLM's own text path is not a reference for forgetting; pass its text backbone (e.g. "
            "Qwen/Qwen2-7B-Instruct for Qwen2-Audio) to measure it."
        )
    unknown = [a for a in config.arms if a not in ARMS]
    if unknown:
        raise ConfigError(f"unknown arm(s) {unknown}; arms are {list(ARMS)}")
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


def item_row(item: Item) -> dict[str, Any]:
    """What scoring and reports need of an item (no audio), one JSON line in ``items.jsonl``."""
    from speechlm_eval.data.registry import scorer_for_subset

    return {
        "id": item.id,
        "subset": item.subset,
        "scorer": scorer_for_subset(item.subset),
        "text": item.text,
        "audio_instruction": item.audio_instruction,
        "speak": item.speak,
        "choices": list(item.choices),
        "reference": item.reference,
        "meta": dict(item.meta),
        "has_audio": item.audio is not None,
    }


def request_identity(config: GapConfig, items_sha256: str) -> dict[str, Any]:
    """The part of the configuration a resumed run must share with the run it continues."""
    return {
        "model": config.model,
        "model_revision": config.model_revision,
        "model_family": config.model_family,
        "text_model": config.text_model,
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
    } | ({"lm_eval_tasks": list(config.lm_eval_tasks)} if config.lm_eval_tasks else {})


def generation_config(config: GapConfig):
    from speechlm_eval.models.base import GenerationConfig

    return GenerationConfig(max_new_tokens=int(config.max_new_tokens or 512), seed=config.seed)


def prepare_run_dir(config: GapConfig, identity: dict[str, Any]) -> None:
    """Refuse to mix runs: an existing run continues only with ``--resume`` and the same request."""
    out = Path(config.out)
    manifest_path = out / "manifest.json"
    has_run = manifest_path.exists() or any((out / "records").glob("*.jsonl"))
    if has_run and config.overwrite:
        for name in ("records", "items.jsonl", "manifest.json", "results.json", "report.md", "report.html", "plots"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    elif has_run and not config.resume:
        raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to start over")
    elif has_run and manifest_path.exists():
        previous = json.loads(manifest_path.read_text()).get("request", {})
        changed = sorted(k for k in set(previous) | set(identity) if previous.get(k) != identity.get(k))
        if changed:
            raise ConfigError(
                f"cannot resume {out}: the request differs from the run's manifest in {', '.join(changed)}"
            )


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "speechlm_eval": __version__}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def run_gap(config: GapConfig, *, console: Any = None) -> Path:
    """Run (or resume) a gap run; returns the run directory holding records, manifest and results."""
    from speechlm_eval.distributed import process_state

    config = resolve_defaults(config)
    items, sources = load_items(config)  # DataError here: nothing loaded yet
    if not items:
        raise ConfigError("the suite selected no items")
    rows = [item_row(i) for i in items]
    items_text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, default=_json_default) + "\n" for r in rows)
    items_sha256 = hashlib.sha256(items_text.encode()).hexdigest()
    identity = request_identity(config, items_sha256)
    state = process_state()
    out = Path(config.out)
    if state.is_main_process:
        prepare_run_dir(config, identity)
    state.wait_for_everyone()

    models = load_models(config)
    audio_source, tts = make_audio_source(config)
    manifest = {
        "schema": MANIFEST_SCHEMA,
        "request": identity,
        "models": {name: m.describe() for name, m in models.items() if m is not None},
        "data": sources,
        "items": {"n": len(items), "sha256": items_sha256,
                  "speech_only": sum(not i.has_text_equivalent for i in items)},
        "generation": generation_config(config).to_dict(),
        "tts": tts.cache_key_fields(),
        "batch_size": config.batch_size,
        "world_size": state.num_processes,
        "seed": config.seed,
        "statistics": {"n_resamples": config.n_resamples, "confidence": 0.95},
        "packages": package_versions(),
        "notes": list(config.notes),
    }
    if state.is_main_process:
        write_text_atomic(out / "items.jsonl", items_text)
        write_json_atomic(out / "manifest.json", manifest)
    state.wait_for_everyone()

    from speechlm_eval.runner import merge_records

    run_arms(config, items, models, audio_source, console)
    state.wait_for_everyone()
    if state.is_main_process:
        merge_records(out, items, config.arms)
    state.wait_for_everyone()
    if config.diagnostics:
        run_diagnostics(config, items, models, audio_source)
        state.wait_for_everyone()
    if state.is_main_process:
        from speechlm_eval.diagnostics import DIAGNOSTICS, PERCEPTION
        from speechlm_eval.judging import judge_run
        from speechlm_eval.report.build import build_report

        merge_records(out, items, [DIAGNOSTICS, PERCEPTION])
        if config.lm_eval_tasks:
            from speechlm_eval.lmeval.run import run_lmeval_tasks

            run_lmeval_tasks(models["speech_llm"], models["text_llm"], list(config.lm_eval_tasks),
                             config.lm_eval_include, out, limit=config.limit, batch_size=config.batch_size,
                             seed=config.seed, spoken=True, tts=tts, n_resamples=config.n_resamples)
        judge_run(out, config.judge, seed=config.seed, device=config.device, dtype=config.dtype)
        build_report(out)
    state.wait_for_everyone()
    return out


def run_diagnostics(config: GapConfig, items: list[Item], models: dict[str, Any], audio_source) -> None:
    """Judge-free diagnostics after the arms: per-token KL/JSD and the perception (transcription) probe."""
    from speechlm_eval.diagnostics import PROBE_INSTRUCTION, run_distribution_diagnostics, run_perception_probe

    out = Path(config.out)
    run_distribution_diagnostics(out, items, models["speech_llm"], models["text_llm"], audio_source,
                                 batch_size=config.batch_size)
    run_perception_probe(out, [i for i in items if i.has_text_equivalent], models["speech_llm"], audio_source,
                         instruction=config.probe_instruction or PROBE_INSTRUCTION, batch_size=config.batch_size,
                         max_new_tokens=min(256, 4 * int(config.max_new_tokens or 64)))


def load_models(config: GapConfig) -> dict[str, Any]:
    from speechlm_eval.models.registry import LoadOptions, detect_family, get_family

    def load(name: str, family: str | None, revision: str | None):
        options = LoadOptions(device=config.device, dtype=config.dtype, revision=revision,
                              trust_remote_code=config.trust_remote_code)
        chosen = get_family(family) if family else detect_family(name, options)
        return chosen, options

    speech_family, speech_options = load(config.model, config.model_family, config.model_revision)
    if not speech_family.accepts_audio and any(a.startswith("speech_llm_speech") for a in config.arms):
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


def run_arms(config: GapConfig, items: list[Item], models: dict[str, Any], audio_source, console: Any) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from speechlm_eval.distributed import process_state
    from speechlm_eval.runner import arms_for, run_arm

    plans = arms_for(items, models["speech_llm"], models["text_llm"], config.arms)
    state = process_state()
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=not state.is_main_process, transient=False) as progress:
        for plan in plans:
            stats = run_arm(plan, Path(config.out), generation=generation_config(config),
                            batch_size=config.batch_size, audio_source=audio_source, progress=progress)
            if stats.errors and state.is_main_process:
                progress.console.print(f"[yellow]{plan.name}: {stats.errors} item(s) got error records")


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays from datasets columns
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
