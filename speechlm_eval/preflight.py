"""Checks a run passes before any model loads, so a typo costs seconds, not the whole run.

Everything here is cheap and fails with a message that says what to change: the seed range, every input path, free
disk space at the run directory and the cache, the TTS engine and voice (one short phrase is spoken), the judge spec,
its key and its endpoint (one ``GET /models``), and the lm-eval task names. ``gap`` runs :func:`check_gap` after
loading the items; ``distill`` runs :func:`check_distill` before its first gap run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

from speechlm_eval.paths import cache_root

SEED_MAX = 2**32 - 1  # numpy's and every seeded draw's range; torch accepts more, numpy does not
MIN_FREE_ENV = "SPEECHLM_EVAL_MIN_FREE_MB"
DEFAULT_MIN_FREE_MB = 200  # records are small; TTS clips, plots and a distilled checkpoint are not
TTS_PROBE = "Testing, one two three."


class PreflightError(ValueError):
    """A run that would fail (or produce nothing usable) as configured; raised before any model is loaded."""


def check_seed(seed: int, flag: str = "--seed") -> None:
    if not 0 <= int(seed) <= SEED_MAX:
        raise PreflightError(f"{flag} must be in [0, {SEED_MAX}] (numpy's seed range), got {seed}")


def looks_local(value: str) -> bool:
    """A path the user meant as a local file or folder (a hub id ``org/name`` does not start like this)."""
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


def check_paths(paths: Iterable[tuple[str, str | os.PathLike[str] | None]], *, folders: Sequence[str] = ()) -> None:
    """Every ``(flag, path)`` given exists (flags in ``folders`` must be directories)."""
    for flag, value in paths:
        if value is None:
            continue
        path = Path(value).expanduser()
        if not path.exists():
            raise PreflightError(f"{flag} {value}: no such file or directory")
        if flag in folders and not path.is_dir():
            raise PreflightError(f"{flag} {value}: not a directory")


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def min_free_bytes() -> int:
    raw = os.environ.get(MIN_FREE_ENV)
    try:
        return int(float(raw) * 2**20) if raw else DEFAULT_MIN_FREE_MB * 2**20
    except ValueError:
        raise PreflightError(f"${MIN_FREE_ENV} must be a number of MiB, got {raw!r}") from None


def check_disk(targets: Iterable[tuple[str, Path]]) -> None:
    """Enough free space (``$SPEECHLM_EVAL_MIN_FREE_MB``, default 200 MiB) where the run and the cache write, and
    the run directory writable."""
    need = min_free_bytes()
    for what, target in targets:
        where = _existing(Path(target))
        free = shutil.disk_usage(where).free
        if free < need:
            raise PreflightError(f"{what} {target}: only {free / 2**20:.0f} MiB free on its disk, below the "
                                 f"{need / 2**20:.0f} MiB a run needs (${MIN_FREE_ENV} sets the minimum)")
        if where.is_dir() and not os.access(where, os.W_OK):
            raise PreflightError(f"{what} {target}: {where} is not writable")


def check_tts(engine: str, voice: str | None, rate: int) -> None:
    """Build the TTS engine and speak one short phrase: an unknown engine or voice fails here, not once per item."""
    from speechlm_eval.speech import get_tts
    from speechlm_eval.speech.engine import check_engine_audio

    options: dict[str, Any] = {"rate": rate}
    if voice is not None:
        options["voice"] = voice
    try:
        tts = get_tts(engine, **options)
        check_engine_audio(tts.synthesize(TTS_PROBE), engine)
    except Exception as error:  # noqa: BLE001 - TTSError, a plug-in's own error, a bad option
        raise PreflightError(f"--tts-engine {engine} --tts-voice {voice}: cannot speak ({error})") from None


def check_judge(spec: str) -> None:
    """The judge spec, its key and its endpoint (:func:`speechlm_eval.judge.run.validate_judge`)."""
    if spec.strip() == "none":
        return
    from speechlm_eval.judge.base import JudgeError
    from speechlm_eval.judge.run import validate_judge

    try:
        validate_judge(spec)
    except JudgeError as error:
        raise PreflightError(f"--judge {spec}: {error}") from None


def check_lmeval_tasks(tasks: Sequence[str], include: str | None) -> None:
    if not tasks:
        return
    from speechlm_eval.lmeval.run import unknown_tasks

    missing = unknown_tasks(tasks, include)
    if missing:
        where = f" (nor in --lm-eval-include {include})" if include else ""
        raise PreflightError(f"--lm-eval-tasks: lm-eval knows no task or group {', '.join(missing)}{where}; "
                             "`lm_eval ls tasks` lists them")


def needs_tts(items: Iterable[Any], arms: Sequence[str], diagnostics: bool, lm_eval_tasks: Sequence[str]) -> bool:
    """Whether anything in the run will synthesise speech: an item without audio on an audio arm or the probe."""
    from speechlm_eval.rundir import ARM_BY_NAME

    audio_arm = any(ARM_BY_NAME[a].audio for a in arms)
    return bool(lm_eval_tasks) or ((audio_arm or diagnostics) and any(getattr(i, "audio", None) is None
                                                                      for i in items))


def check_gap(config: Any, items: Sequence[Any]) -> None:
    """Every check of a gap run, cheapest first (``config`` is a resolved :class:`speechlm_eval.gap.GapConfig`)."""
    check_seed(config.seed)
    check_paths([("--data-dir", config.data_dir), ("--mmau-json", config.mmau_json),
                 ("--mmau-audio-dir", config.mmau_audio_dir), ("--lm-eval-include", config.lm_eval_include)],
                folders=("--data-dir", "--mmau-audio-dir", "--lm-eval-include"))
    check_disk([("--out", Path(config.out)), ("cache", cache_root())])
    if needs_tts(items, config.arms, config.diagnostics, config.lm_eval_tasks):
        check_tts(config.tts_engine, config.tts_voice, config.tts_rate)
    check_lmeval_tasks(list(config.lm_eval_tasks), config.lm_eval_include)
    check_judge(config.judge)


def check_distill(config: Any) -> None:
    """The checks of a distillation (a resolved :class:`speechlm_eval.distill.config.DistillConfig`)."""
    check_seed(config.seed)
    data = str(config.data) if config.data is not None else None
    check_paths([("--data", data if data is not None and looks_local(data) else None)])
    check_disk([("--out", Path(config.out)), ("cache", cache_root())])
    if "st" in config.active_channels():
        check_tts(config.tts_engine, config.tts_voice, config.tts_rate)
