"""Served gap throughput: items/s of the gap runner against a local ``transformers serve`` at concurrency 1, 8 and 32,
and of in-process per-item generation on the same checkpoint, printed as ratios, with a check that every answer is
identical.

What it runs: the shipped model organism (the embedded default), its 144 held-out items, on the arm chosen with
``--arm`` (default ``speech_llm_speech``: Qwen2-Audio served, espeak-ng audio sent as ``input_audio`` WAV;
``text_llm_text``: the Qwen2 text LLM). Each configuration answers every item through the runner's own
``answer_batch`` (served: batches of ``concurrency`` prompts, as ``gap --base-url`` sends them; in-process: one prompt
per generate call, VoiceBench's loop). Timed repeats alternate between configurations; medians are reported.

Run: ``.venv/bin/python benchmarks/bench_served.py [--arm text_llm_text] [--items 144] [--repeats 3]``.

Reading the numbers: ``transformers serve`` answers one request at a time on one inference thread (no batching
without ``--continuous-batching``, which it offers for LLMs only), so concurrency can only hide the client's and the
HTTP stack's latency, not add decode throughput. A server that batches concurrent requests (vLLM, SGLang) is what
turns concurrency into items/s; the script prints which case it measured.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/fixtures server helpers

import argparse
import statistics
import tempfile
import time
from typing import Any, Callable

import torch

from speechlm_eval.data.suite import load_suite, parse_suite
from speechlm_eval.embedded import EMBEDDED_MAX_NEW_TOKENS, EMBEDDED_SUITE, embedded_models
from speechlm_eval.gap import GapConfig, make_audio_source
from speechlm_eval.models.base import GenerationConfig
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.models.served import ServedModel
from speechlm_eval.runner import ArmPlan, answer_batch, batches, sorted_for_batching
from tests.fixtures.served import serve_local

CONCURRENCIES = (1, 8, 32)
# What "concurrency 8 scales" means here: at least this many times the items/s of concurrency 1.
SCALING_TARGET = 3.0


def answer_all(plan: ArmPlan, batch_size: int, generation: GenerationConfig, audio_source: Any) -> dict[str, Any]:
    """Every item's answer through the runner's batch path; an error record fails the benchmark."""
    out = {}
    for batch in batches(sorted_for_batching(plan.items, plan), batch_size):
        for record in answer_batch(plan, batch, generation, audio_source):
            if record["error"] is not None:
                raise RuntimeError(f"{record['id']}: {record['error']['message']}")
            out[record["id"]] = (record["response"], record["n_new_tokens"])
    return out


def timed(run: Callable[[], dict[str, Any]], n: int) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    answers = run()
    return n / (time.perf_counter() - start), answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arm", choices=["speech_llm_speech", "text_llm_text"], default="speech_llm_speech")
    parser.add_argument("--items", type=int, default=144, help="first N of the organism's 144 items")
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed repeats; medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the in-process model and of the "
                        "server (1: what gap uses for models under 100 M parameters on CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    speech_path, text_path = embedded_models()
    path = speech_path if args.arm == "speech_llm_speech" else text_path
    with_audio = args.arm == "speech_llm_speech"
    items, _ = load_suite(parse_suite(EMBEDDED_SUITE), limit=args.items)
    audio_source, _ = make_audio_source(GapConfig(out=Path(tempfile.gettempdir())))
    if with_audio:  # synthesise (and cache) before timing: every configuration then reads the same cached audio
        for item in items:
            audio_source(item)
    generation = GenerationConfig(max_new_tokens=EMBEDDED_MAX_NEW_TOKENS)
    local = load_model(str(path), LoadOptions(device="cpu"))

    with tempfile.TemporaryDirectory() as logs, serve_local(path, Path(logs), threads=args.threads) as server:
        runs: dict[str, Callable[[], dict[str, Any]]] = {
            "in-process, 1 item per call": lambda: answer_all(ArmPlan(args.arm, local, items, with_audio), 1,
                                                              generation, audio_source)}
        for c in CONCURRENCIES:
            served = ServedModel(server.model, server.base_url, concurrency=c, accepts_audio=with_audio)
            runs[f"served, concurrency {c}"] = (
                lambda m=served, c=c: answer_all(ArmPlan(args.arm, m, items, with_audio), c, generation,
                                                 audio_source))
        for run in runs.values():  # warm-up: first requests pay the server's and the kernels' one-off costs
            run()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        answers: dict[str, dict[str, Any]] = {}
        for _ in range(args.repeats):
            for name, run in runs.items():
                rate, answers[name] = timed(run, len(items))
                rates[name].append(rate)

    median = {name: statistics.median(values) for name, values in rates.items()}
    reference = answers["in-process, 1 item per call"]
    base = median["in-process, 1 item per call"]
    c1 = median["served, concurrency 1"]
    print(f"arm {args.arm}, {len(items)} items, max_new_tokens {EMBEDDED_MAX_NEW_TOKENS}, "
          f"medians of {args.repeats} repeats, {torch.get_num_threads()} torch thread(s) in-process and in the server")
    print(f"{'configuration':<30} {'items/s':>9} {'vs in-process':>14} {'vs concurrency 1':>17} {'identical':>10}")
    for name, rate in median.items():
        same = sum(answers[name][i] == reference[i] for i in reference)
        versus_c1 = f"{rate / c1:.2f}x" if name.startswith("served") else ""
        print(f"{name:<30} {rate:>9.1f} {rate / base:>13.2f}x {versus_c1:>17} {same:>5}/{len(reference)}")
    scaling = median["served, concurrency 8"] / c1
    if scaling >= SCALING_TARGET:
        print(f"concurrency 8 = {scaling:.2f}x concurrency 1 (target >= {SCALING_TARGET:.0f}x): the server overlaps "
              "concurrent requests.")
    else:
        print(f"concurrency 8 = {scaling:.2f}x concurrency 1, short of the {SCALING_TARGET:.0f}x target: transformers "
              "serve answers one request at a time (one inference thread, no batching for this model), so requests "
              "in flight only queue; concurrency hides client and HTTP latency, nothing more. A batching server "
              "(vllm serve, SGLang) is what concurrency is for.")


if __name__ == "__main__":
    main()
