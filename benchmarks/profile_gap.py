"""Where the time of one ``speechlm-eval gap`` run goes: a table of phases (start-up and imports, data, model load, TTS,
feature extraction, prompt encoding, generate per arm, the KL/JSD pass, the perception probe, records, scoring,
bootstrap, plots, report), each with its seconds and its share of the whole process.

How it measures: each configuration runs in a fresh subprocess that installs timing hooks around the pipeline's own
functions (nothing of the pipeline is copied here) and then runs the real command line (``speechlm_eval.cli.main``).
Time is charged to the innermost phase running, so the phases do not overlap and their sum is the process's wall time
("other" is what no hook covers: typer, the summary table, glue). "interpreter" is the Python start-up before the first
line of the child runs, measured from the parent. Hooks are installed as the modules they patch are imported, so
lazily imported modules stay lazy. Also printed: diagnostics (KL/JSD pass + probe) as a share of the arms' generate
time (target: at most 50% on the organism).

Configurations: ``organism`` (the embedded default: ``gap`` with no model arguments) and ``wide`` (a random 4-layer,
512-wide tiny Qwen2-Audio and its Qwen2 text LLM, ``tests.fixtures.tiny.WIDE_SPEC``, built offline on first use, on
the organism's suite of 144 questions at ``--max-new-tokens 64``).

Run: ``.venv/bin/python benchmarks/profile_gap.py [--config organism --config wide] [--threads 1] [--limit N]``.
The TTS cache is warmed by a first untimed run of each configuration (``--cold`` times the first run instead).
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # before any import the child makes: everything after this is charged to a phase

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
ORGANISM_SUITE = "organism:organism_mcq@seed0"


class PhaseClock:
    """Exclusive wall time per phase: a stack of running phases; elapsed time goes to the one on top."""

    def __init__(self, base: str = "other") -> None:
        self.stack = [base]
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.mark = _START

    def _charge(self) -> None:
        now = time.perf_counter()
        top = self.stack[-1]
        self.seconds[top] = self.seconds.get(top, 0.0) + now - self.mark
        self.mark = now

    def enter(self, phase: str) -> None:
        self._charge()
        self.stack.append(phase)
        self.calls[phase] = self.calls.get(phase, 0) + 1

    def leave(self) -> None:
        self._charge()
        self.stack.pop()

    def wrap(self, fn: Callable, phase: str | Callable[..., str]) -> Callable:
        """``fn`` timed as ``phase`` (a name, or a function of the call's arguments giving one)."""
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.enter(phase(*args, **kwargs) if callable(phase) else phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        timed.__profile_gap_hooked__ = True  # type: ignore[attr-defined]
        return timed


def _arm_phase(plan: Any, *_: Any, **__: Any) -> str:
    return f"generate: {plan.name}"


# module -> [(attribute path, phase)]: the pipeline's own functions, hooked when their module is first imported.
HOOKS: dict[str, list[tuple[str, str | Callable[..., str]]]] = {
    "speechlm_eval.gap": [("load_items", "data"), ("item_row", "data"), ("load_models", "model load"),
                          ("make_audio_source", "TTS / audio")],
    "speechlm_eval.preflight": [("check_gap", "data")],
    "speechlm_eval.runner": [("run_arm", _arm_phase)],
    "speechlm_eval.diagnostics": [("run_distribution_diagnostics", "diagnostics: KL/JSD pass"),
                                  ("run_perception_probe", "diagnostics: perception probe"),
                                  # the same passes on top of the speech arm's prompt cache (--reuse-prompt-cache):
                                  # their own tokens only; the prompts' prefill stays with the arm, which needs it
                                  ("SpeechArmDiagnostics._divergences", "diagnostics: KL/JSD pass"),
                                  ("SpeechArmDiagnostics._probe", "diagnostics: perception probe")],
    "speechlm_eval.speech.cache": [("CachedTTS.synthesize", "TTS / audio")],
    "speechlm_eval.data.audio": [("decode_audio", "TTS / audio")],
    "speechlm_eval.models.audio_text": [("AudioTextModel.encode", "prompt encoding (template, tokens)")],
    "speechlm_eval.models.hf_causal": [("CausalLMModel.encode", "prompt encoding (template, tokens)")],
    "transformers.models.whisper.feature_extraction_whisper": [
        ("WhisperFeatureExtractor.__call__", "feature extraction (log-mel)")],
    "speechlm_eval.records": [("RecordWriter.write_many", "records I/O")],
    "speechlm_eval.judge.run": [("judge_run", "judge")],
    "speechlm_eval.report.build": [("build_report", "report (markdown, html)"),
                                   ("build_results_and_scores", "scoring")],
    "speechlm_eval.metrics.paired": [("paired_gap", "bootstrap"), ("mean_ci", "bootstrap")],
    "speechlm_eval.report.plots": [("report_figures", "plots"), ("write_plots", "plots")],
}


def _hook_module(clock: PhaseClock, name: str, module: Any) -> None:
    for path, phase in HOOKS.get(name, []):
        owner, _, attr = path.rpartition(".")
        target = getattr(module, owner) if owner else module
        original = getattr(target, attr)
        if not getattr(original, "__profile_gap_hooked__", False):
            setattr(target, attr, clock.wrap(original, phase))


def install(clock: PhaseClock) -> None:
    """Time every import as "imports" and hook :data:`HOOKS` as their modules load (``importlib._bootstrap`` looks
    ``_find_and_load`` up on itself for every import statement and ``import_module`` call)."""
    import importlib._bootstrap as bootstrap

    original = bootstrap._find_and_load

    def find_and_load(name: str, import_: Any) -> Any:
        clock.enter("imports")
        try:
            module = original(name, import_)
        finally:
            clock.leave()
        if name in HOOKS:
            _hook_module(clock, name, module)
        return module

    bootstrap._find_and_load = find_and_load
    for name in HOOKS:  # modules already loaded (none of the pipeline's, normally)
        if name in sys.modules:
            _hook_module(clock, name, sys.modules[name])


def gap_argv(config: str, out: Path, threads: int, limit: int | None) -> list[str]:
    """The ``gap`` command line of a configuration."""
    argv = ["gap", "--out", str(out), "--overwrite", "--threads", str(threads)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if config == "organism":
        return argv
    sys.path.insert(0, str(ROOT))
    from speechlm_eval.paths import cache_root
    from tests.fixtures.tiny import WIDE_NAME, WIDE_SPEC, cached_random_pair

    speech, text = cached_random_pair(cache_root(), WIDE_NAME, WIDE_SPEC)
    return argv + ["--model", str(speech), "--text-model", str(text), "--suite", ORGANISM_SUITE,
                   "--max-new-tokens", "64"]


def child(argv: list[str], result_path: Path) -> None:
    """Run ``speechlm-eval`` with ``argv`` under the hooks; write the phase seconds to ``result_path``."""
    clock = PhaseClock()
    install(clock)
    from speechlm_eval.cli import main

    sys.argv = ["speechlm-eval", *argv]
    code = 0
    try:
        main()
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    clock._charge()
    threads = None
    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    result_path.write_text(json.dumps({"seconds": clock.seconds, "calls": clock.calls, "exit": code,
                                       "torch_threads": threads}))


def run_child(argv: list[str]) -> dict[str, Any]:
    """One whole ``gap`` process under the hooks; its phases plus "interpreter" (start-up before its first line)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "phases.json"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child", str(result), "--", *argv], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0 or not result.exists():
            raise SystemExit(f"gap {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
        phases = json.loads(result.read_text())
    inside = sum(phases["seconds"].values())
    phases["seconds"]["interpreter"] = max(0.0, wall - inside)
    phases["wall"] = wall
    return phases


ORDER = ["interpreter", "imports", "data", "model load", "TTS / audio", "feature extraction (log-mel)",
         "prompt encoding (template, tokens)", "generate: text_llm_text", "generate: speech_llm_text",
         "generate: speech_llm_speech", "diagnostics: KL/JSD pass", "diagnostics: perception probe", "records I/O",
         "judge", "scoring", "bootstrap", "plots", "report (markdown, html)", "other"]


def print_table(config: str, argv: list[str], phases: dict[str, Any]) -> None:
    seconds: dict[str, float] = phases["seconds"]
    wall = phases["wall"]
    print(f"\n{config}: speechlm-eval {' '.join(argv)}")
    print(f"whole process {wall:.2f} s, torch threads {phases['torch_threads']}")
    print(f"{'phase':<38} {'seconds':>8} {'share':>7} {'calls':>6}")
    for name in ORDER + sorted(set(seconds) - set(ORDER)):
        if name in seconds:
            calls = phases["calls"].get(name, "")
            print(f"{name:<38} {seconds[name]:>8.2f} {100 * seconds[name] / wall:>6.1f}% {calls:>6}")
    arms = sum(v for k, v in seconds.items() if k.startswith("generate: "))
    diagnostics = sum(v for k, v in seconds.items() if k.startswith("diagnostics: "))
    if arms:
        print(f"diagnostics / arms' generate = {diagnostics:.2f} s / {arms:.2f} s = {100 * diagnostics / arms:.0f}% "
              "(target <= 50% on the organism)")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[sys.argv.index("--") + 1:], Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", choices=["organism", "wide"],
                        help="repeatable; default: both")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--limit", type=int, default=None, help="first N items (smoke runs)")
    parser.add_argument("--cold", action="store_true", help="time the first run (TTS synthesised) instead of a "
                        "second one (TTS cache warm)")
    parser.add_argument("--json", type=Path, default=None, help="also write the tables as JSON here")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} on {os.cpu_count()} CPUs (other processes slow every phase alike)")
    tables = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.config or ["organism", "wide"]:
            argv = gap_argv(config, Path(tmp) / config, args.threads, args.limit)
            if not args.cold:
                run_child(argv)  # warms the TTS cache and the OS's file cache
            tables[config] = run_child(argv)
            print_table(config, argv, tables[config])
    if args.json:
        args.json.write_text(json.dumps(tables, indent=1))


if __name__ == "__main__":
    main()
