"""``speechlm-eval gap`` against an independent per-item loop, whole process on both sides: items/s, the ratio, and
how many answers are identical.

The baseline is ``benchmarks/voicebench_loop.py``, written the way VoiceBench's ``main.py`` drives Qwen2-Audio (one
item at a time: chat template, processor, ``generate``, decode) and importing nothing from speechlm_eval. Each side
runs as its own subprocess, timed from start to exit (imports, model load, answering, and for gap its records,
scoring, bootstrap, plots and report): what a user waits for. gap runs one arm (``--arm``, diagnostics off: the loop
runs none); the loop answers the same items with the same checkpoint, token budget, greedy decoding and thread count.
Both read the same cached TTS clips (synthesised before anything is timed).

Besides the ratio it prints two figures that say how far the ratio can go on this machine:
- ``ceiling``: the loop's time over its own fixed cost (the same loop with ``--limit 0``: interpreter, imports of
  torch and transformers, model and processor load, exit). gap cannot start faster than that (it imports the same
  libraries and loads the same checkpoint), so even a gap that answered in no time would be this many times faster
  and no more. Where answering is short next to start-up (the organism), the ceiling is low.
- ``answering``: the ratio of the two sides' times after their fixed costs (the loop minus its ``--limit 0`` run, gap
  minus a one-item run): what batching buys once both processes are up.

Models (``--model``, repeatable): ``organism`` (the shipped model organism's speech LLM, 1.3 M parameters, on
its suite's 144 questions; its answers end after two tokens) and ``wide`` (a
random 4-layer, 512-wide tiny Qwen2-Audio, ``tests.fixtures.tiny.WIDE_SPEC``, on the seed-0 suite, 144 questions).
Arms: ``speech_llm_text`` (VoiceBench's text modality) and ``speech_llm_speech`` (its audio modality).

``--in-process``: the earlier comparison, inside one process: the runner's batches vs one ``generate`` call per item
through the same adapter.

Run: ``.venv/bin/python benchmarks/bench_gap.py [--model wide] [--arm speech_llm_speech] ``.
Numbers depend on the machine's load: the script prints the load average beside them.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tests/fixtures model builders

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from typing import Any

ARMS = ("speech_llm_text", "speech_llm_speech")
WIDE_MAX_NEW_TOKENS = 64
ORGANISM_MAX_NEW_TOKENS = 32


ORGANISM_SUITE = "organism:organism_mcq@seed0"  # one world only: item ids repeat across seeds


def model_paths(model: str) -> tuple[Path, Path]:
    """(speech LLM, text LLM) of a configuration."""
    from speechlm_eval.embedded import embedded_models
    from speechlm_eval.paths import cache_root
    from tests.fixtures.tiny import WIDE_NAME, WIDE_SPEC, cached_random_pair

    if model == "organism":
        return embedded_models()
    return cached_random_pair(cache_root(), WIDE_NAME, WIDE_SPEC)


def write_items(suites: list[str], path: Path) -> int:
    """The suites' items as the loop's JSONL (``id``, ``text``, ``wav``), each clip synthesised into gap's TTS cache
    first (so neither side synthesises while timed); returns the number of items."""
    from speechlm_eval.data.suite import load_suite, parse_suite
    from speechlm_eval.gap import GapConfig, make_audio_source

    items, _ = load_suite([r for spec in suites for r in parse_suite(spec)])
    _, tts = make_audio_source(GapConfig(out=path.parent))
    with path.open("w", encoding="utf-8") as sink:
        for item in items:
            spoken = item.text_to_speak() or ""
            tts.synthesize(spoken)
            sink.write(json.dumps({"id": item.id, "text": item.text, "wav": str(tts.path_for(spoken))}) + "\n")
    return len(items)


# A slim launcher between this script and each timed process: a child forked from this (large) process would count
# this process's pages in its peak RSS until it execs; forked from the launcher, it starts from a few MiB. It also
# samples the child's anonymous memory (Linux's RssAnon, every 20 ms): peak RSS counts file pages mapped into the
# process too (a memory-mapped dataset's clips, once read), which the kernel can drop at any time.
_LAUNCHER = """
import resource, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:])
anon = 0
while child.poll() is None:
    try:
        with open(f"/proc/{child.pid}/status") as status:
            anon = max([anon] + [int(line.split()[1]) for line in status if line.startswith("RssAnon:")])
    except (OSError, ValueError):
        pass
    time.sleep(0.02)
sys.stderr.write(f"\\n__peak_kib__ {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {anon}\\n")
sys.exit(child.returncode)
"""


def timed_process(argv: list[str]) -> tuple[float, int, int]:
    """Wall seconds, peak resident memory (KiB, Linux's ``ru_maxrss``) and peak anonymous memory (KiB, sampled; 0
    where ``/proc`` has no RssAnon) of one subprocess, which must succeed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile(mode="w+", encoding="utf-8") as stderr:
        start = time.perf_counter()
        code = subprocess.call([sys.executable, "-S", "-c", _LAUNCHER, *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=stderr)
        seconds = time.perf_counter() - start
        stderr.seek(0)
        text = stderr.read()
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{text[-3000:]}")
    peak, anon = (int(v) for v in text.rsplit("__peak_kib__ ", 1)[1].split()[:2])
    return seconds, peak, anon


def gap_argv(speech: Path, suites: list[str], arms: list[str], out: Path, args: argparse.Namespace,
             max_new_tokens: int, diagnostics: bool, text: Path | None = None, limit: int | None = None) -> list[str]:
    argv = [sys.executable, "-m", "speechlm_eval.cli", "gap", "--model", str(speech), "--out", str(out),
            "--overwrite", "--max-new-tokens", str(max_new_tokens), "--threads", str(args.threads)]
    argv += [x for s in suites for x in ("--suite", s)] + [x for a in arms for x in ("--arm", a)]
    argv += ["--text-model", str(text)] if text is not None else []
    argv += ["--limit", str(limit)] if limit is not None else []
    argv += ["--batch-size", str(args.batch_size)] if args.batch_size else []
    return argv + ([] if diagnostics else ["--no-diagnostics"])


def read_answers(path: Path) -> dict[str, str | None]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {r["id"]: r["response"] for r in rows}


def compare_arm(model: str, arm: str, speech: Path, suites: list[str], items: Path, n: int, tmp: Path,
                args: argparse.Namespace) -> dict[str, Any]:
    """One arm, both sides, ``args.repeats`` alternating repeats; medians."""
    max_new_tokens = args.max_new_tokens or (ORGANISM_MAX_NEW_TOKENS if model == "organism" else WIDE_MAX_NEW_TOKENS)
    out = tmp / f"gap-{model}-{arm}"
    answers = tmp / f"loop-{model}-{arm}.jsonl"
    loop = [sys.executable, str(ROOT / "benchmarks" / "voicebench_loop.py"), "--model", str(speech), "--items",
            str(items), "--modality", "audio" if arm == "speech_llm_speech" else "text", "--max-new-tokens",
            str(max_new_tokens), "--threads", str(args.threads), "--out", str(answers)]
    gap = gap_argv(speech, suites, [arm], out, args, max_new_tokens, diagnostics=False)
    gap_one = gap_argv(speech, suites, [arm], tmp / f"gap1-{model}-{arm}", args, max_new_tokens, diagnostics=False,
                       limit=1)
    loop_none = loop[:-1] + [str(tmp / "loop-none.jsonl"), "--limit", "0"]
    gap_s, loop_s, gap1_s, loop0_s = [], [], [], []
    for _ in range(args.repeats):
        gap_s.append(timed_process(gap)[0])
        loop_s.append(timed_process(loop)[0])
        gap1_s.append(timed_process(gap_one)[0])
        loop0_s.append(timed_process(loop_none)[0])
    ours, theirs = read_answers(out / "records" / f"{arm}.jsonl"), read_answers(answers)
    identical = sum(ours.get(i) == r for i, r in theirs.items())
    g, b = statistics.median(gap_s), statistics.median(loop_s)
    g1, b0 = statistics.median(gap1_s), statistics.median(loop0_s)
    manifest = json.loads((out / "manifest.json").read_text())
    return {"model": model, "arm": arm, "items": n, "max_new_tokens": max_new_tokens,
            "batch_size": manifest.get("batch_size"), "threads": manifest.get("threads"), "repeats": args.repeats,
            "gap_s": round(g, 2), "loop_s": round(b, 2), "gap_items_per_s": round(n / g, 2),
            "loop_items_per_s": round(n / b, 2), "ratio": round(b / g, 2), "identical": f"{identical}/{len(theirs)}",
            "gap_one_item_s": round(g1, 2), "loop_start_up_s": round(b0, 2), "ceiling": round(b / b0, 2),
            "answering": round((b - b0) / max(g - g1, 1e-9), 2)}


def independent_comparison(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows = []
    for model in args.model or ["organism", "wide"]:
        speech, _ = model_paths(model)
        suites = [ORGANISM_SUITE]
        items = tmp / f"items-{model}.jsonl"
        n = write_items(suites, items)
        for arm in args.arm or ARMS:
            row = compare_arm(model, arm, speech, suites, items, n, tmp, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'model':<9} {'arm':<18} {'items':>5} {'tokens':>6} {'batch':>5} {'gap it/s':>9} {'loop it/s':>9} "
          f"{'ratio':>6} {'ceiling':>8} {'answering':>9} {'identical':>10}")
    for r in rows:
        print(f"{r['model']:<9} {r['arm']:<18} {r['items']:>5} {r['max_new_tokens']:>6} {r['batch_size']!s:>5} "
              f"{r['gap_items_per_s']:>9.2f} {r['loop_items_per_s']:>9.2f} {r['ratio']:>5.2f}x {r['ceiling']:>7.2f}x "
              f"{r['answering']:>8.2f}x {r['identical']:>10}")
    return rows


def in_process_comparison(args: argparse.Namespace) -> None:
    """The earlier bench: the runner's batches vs one generate call per item, inside one process, tiny random pair."""
    import dataclasses

    import torch

    from speechlm_eval.data.suite import load_suite, parse_suite
    from speechlm_eval.gap import GapConfig, make_audio_source
    from speechlm_eval.models.base import GenerationConfig
    from speechlm_eval.models.registry import LoadOptions, load_model
    from speechlm_eval.paths import cache_root
    from speechlm_eval.runner import ArmPlan, answer_batch, batches, build_prompt, sorted_for_batching
    from tests.fixtures.tiny import cached_random_pair

    torch.set_num_threads(args.threads)
    base = [i for i in load_suite(parse_suite("bundled"))[0] if i.has_text_equivalent]
    items = [dataclasses.replace(base[k % len(base)], id=f"{base[k % len(base)].id}#{k}",
                                 text=(f"Question {k // len(base) + 1}. " if k >= len(base) else "")
                                 + base[k % len(base)].text) for k in range(64)]
    model = load_model(str(cached_random_pair(cache_root())[0]), LoadOptions(device="cpu"))
    audio_source, _ = make_audio_source(GapConfig(out=Path(tempfile.gettempdir())))
    generation = GenerationConfig(max_new_tokens=24)
    batch_size = args.batch_size or 16
    for arm in args.arm or ARMS:
        with_audio = arm == "speech_llm_speech"
        plan = ArmPlan(arm, model, items, with_audio=with_audio)
        start = time.perf_counter()
        single = {i.id: model.generate([build_prompt(i, with_audio, audio_source)], generation)[0].text
                  for i in items}
        single_s = time.perf_counter() - start
        start = time.perf_counter()
        batched = {r["id"]: r["response"] for batch in batches(sorted_for_batching(items, plan), batch_size)
                   for r in answer_batch(plan, batch, generation, audio_source)}
        batched_s = time.perf_counter() - start
        same = sum(single[i] == batched[i] for i in single)
        print(json.dumps({"in_process": arm, "items": len(items), "batch_size": batch_size,
                          "one_at_a_time_items_per_s": round(len(items) / single_s, 2),
                          "batched_items_per_s": round(len(items) / batched_s, 2),
                          "speedup": round(single_s / batched_s, 2), "identical_outputs": f"{same}/{len(items)}"}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", choices=["organism", "wide"], help="repeatable; default both")
    parser.add_argument("--arm", action="append", choices=list(ARMS), help="repeatable; default both")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default {ORGANISM_MAX_NEW_TOKENS} (organism), {WIDE_MAX_NEW_TOKENS} (wide)")
    parser.add_argument("--batch-size", default=None, help="gap's --batch-size (default: gap's own default)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--repeats", type=int, default=1, help="alternating repeats per side; medians reported")
    parser.add_argument("--in-process", action="store_true", help="also the earlier in-process comparison")
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; {args.threads} torch thread(s) per side")
    with tempfile.TemporaryDirectory() as tmp:
        independent_comparison(args, Path(tmp))
    if args.in_process:
        in_process_comparison(args)


if __name__ == "__main__":
    main()
