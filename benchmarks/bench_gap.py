"""Batched runner vs VoiceBench's one-item-at-a-time loop: items/s, the ratio, and a check that outputs are identical.

Baseline named: VoiceBench ``main.py`` answers items one by one (``model.generate`` on a single prompt per call).
Run: ``.venv/bin/python benchmarks/bench_gap.py [--batch-size 16] [--items 64] [--arm speech_llm_text]``.
Uses the tiny random pair (tests.fixtures.tiny.cached_random_pair, built offline on first use) on the bundled suite, replicated to ``--items``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests/fixtures model builders

import argparse
import dataclasses
import json
import statistics
import time

import torch

from speechlm_eval.paths import cache_root
from tests.fixtures.tiny import cached_random_pair
from speechlm_eval.data.registry import SubsetRequest
from speechlm_eval.data.suite import load_suite, parse_suite
from speechlm_eval.gap import GapConfig, make_audio_source
from speechlm_eval.models.base import GenerationConfig
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.runner import ArmPlan, answer_batch, batches, build_prompt, sorted_for_batching


def bench_items(n: int):
    """``n`` text-equivalent bundled items (copies get distinct ids; prompts vary by a numbered prefix)."""
    requests: list[SubsetRequest] = parse_suite("bundled")
    items, _ = load_suite(requests)
    items = [i for i in items if i.has_text_equivalent]
    out = []
    for k in range(n):
        base = items[k % len(items)]
        prefix = f"Question {k // len(items) + 1}. " if k >= len(items) else ""
        out.append(dataclasses.replace(base, id=f"{base.id}#{k}", text=prefix + base.text))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--arm", choices=["speech_llm_text", "speech_llm_speech"], default="speech_llm_text")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating timed repeats; medians are reported")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    speech_path, _ = cached_random_pair(cache_root())
    model = load_model(str(speech_path), LoadOptions(device="cpu"))
    items = bench_items(args.items)
    with_audio = args.arm == "speech_llm_speech"
    audio_source, _ = make_audio_source(GapConfig(out=None))  # type: ignore[arg-type]
    generation = GenerationConfig(max_new_tokens=args.max_new_tokens)
    if with_audio:  # synthesise (and cache) before timing: both loops then read the same cached audio
        window = (model.max_audio_seconds or float("inf")) * 16_000
        items = [item for item in items if len(audio_source(item)) <= window]

    plan = ArmPlan(args.arm, model, items, with_audio=with_audio)

    def one_at_a_time() -> dict[str, str]:
        # Baseline: one item per generate call, in dataset order (VoiceBench main.py).
        return {item.id: model.generate([build_prompt(item, with_audio, audio_source)], generation)[0].text
                for item in items}

    def batched_runner() -> dict[str, str]:
        out = {}
        for batch in batches(sorted_for_batching(items, plan), args.batch_size):
            for record in answer_batch(plan, batch, generation, audio_source):
                out[record["id"]] = record["response"]
        return out

    # Alternate the two loops and keep each one's median: a shared machine's load then hits both alike.
    single_times, batched_times = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        single = one_at_a_time()
        single_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        batched = batched_runner()
        batched_times.append(time.perf_counter() - start)
    single_s, batched_s = statistics.median(single_times), statistics.median(batched_times)

    identical = sum(single[i] == batched[i] for i in single)
    report = {
        "arm": args.arm,
        "items": len(items),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "threads": args.threads,
        "repeats": args.repeats,
        "one_at_a_time_items_per_s": round(len(items) / single_s, 2),
        "batched_items_per_s": round(len(items) / batched_s, 2),
        "speedup": round(single_s / batched_s, 2),
        "identical_outputs": f"{identical}/{len(items)}",
    }
    print(json.dumps(report, indent=2))
    if identical != len(items):
        raise SystemExit("batched outputs differ from one-at-a-time outputs")


if __name__ == "__main__":
    main()
