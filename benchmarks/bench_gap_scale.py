"""How a whole ``speechlm-eval gap`` run grows with its items: time and peak memory at 100 and at 800 items.

The items are a local VoiceBench copy built here (``save_to_disk`` layout, subset ``openbookqa``, the way a user's
``--data-dir`` copy is read): the questions of the organism's worlds of seeds 0-9 (423 distinct ones, repeated in
order past that), each with a WAV clip synthesised by gap's own TTS engine and scaled by its own gain
(1 - k x 1e-4, inaudible), so every item carries encoded audio the way VoiceBench rows do and no two items share a
clip (the audio encoder cache cannot hit across items). The
model is the shipped organism pair (speech LLM and text LLM): the default run, three arms, the KL/JSD pass and the
perception probe, with records, scoring, bootstrap, plots and report, as a user gets it.

Every run has the same ``--batch-size`` (default 64), so a larger run has more batches, not larger ones. Each run is a
fresh subprocess (one torch thread) running ``gap`` under ``profile_gap.py``'s phase hooks, timed from start to exit,
with its peak resident memory (``ru_maxrss``) and its peak anonymous memory (RssAnon sampled every 20 ms: what the
process allocates; peak RSS also counts the pages of the memory-mapped dataset it has read, which the kernel can
drop). Runs at 100, 400 and 800 items (medians of ``--repeats``). Printed:
- ``time ratio``: wall seconds at 800 items over wall seconds at 100 (linear cost: at most 1.15 x 8 = 9.2; start-up
  is paid once, so a whole-process ratio comes out lower);
- the per-item phases' seconds (the arms' generate, the KL pass, the probe, features, prompt encoding, audio reads,
  records, scoring, bootstrap; start-up, imports, model load, plots and report left out) at 100, 400 and 800 items,
  their 800/100 ratio (linear: 8, within 9.2), and the ``slope ratio``: their seconds per added item from 400 to 800
  over those from 100 to 400 (1 = linear; above 1.15, a cost grows faster than the items). Whole-process
  differences would carry the start-up's noise (imports alone vary by two seconds here);
- ``memory``: peaks at 100 and 800 items and the growth per added item.

Three configurations: ``default`` (the KL/JSD pass and the probe on top of the speech arm's prompt cache; no audio
cache, since nothing would read it), ``separate+cache`` (``--no-reuse-prompt-cache``: the two passes on their own,
with the audio cache keeping each clip's encoder output and log-mel features up to ``--audio-cache-gib``, so memory
grows with the clips until that bound) and ``separate`` (also ``--no-cache-audio-encoder``).

Run: ``.venv/bin/python benchmarks/bench_gap_scale.py [--repeats 3] [--batch-size 64]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import io
import json
import os
import statistics
import tempfile
from typing import Any

from benchmarks.bench_gap import timed_process

SUBSET = "openbookqa"


def build_voicebench_copy(root: Path, count: int) -> Path:
    """``root/openbookqa`` as a save_to_disk DatasetDict (split ``test``) of ``count`` organism questions with
    synthesised WAV clips; returns ``root`` (the ``--data-dir``)."""
    import datasets
    import soundfile as sf

    from speechlm_eval.data.organism import SEED_SPLITS
    from speechlm_eval.data.suite import load_suite, parse_suite
    from speechlm_eval.gap import GapConfig, make_audio_source

    _, tts = make_audio_source(GapConfig(out=root))
    questions = list(dict.fromkeys((item.text, item.reference) for split in SEED_SPLITS
                                   for item in load_suite(parse_suite(f"organism:organism_mcq@{split}"))[0]))
    rows: list[dict[str, Any]] = []
    for k in range(count):  # the worlds hold a few hundred distinct questions; every clip gets its own gain
        prompt, reference = questions[k % len(questions)]
        clip = tts.synthesize(prompt) * (1.0 - 1e-4 * k)
        buffer = io.BytesIO()
        sf.write(buffer, clip, 16_000, format="WAV", subtype="FLOAT")
        rows.append({"prompt": prompt, "reference": reference, "audio": {"bytes": buffer.getvalue(), "path": f"q{k}.wav"}})
    # Built as a {bytes, path} struct, then cast: encoding through datasets.Audio would need torchcodec.
    dataset = datasets.Dataset.from_list(rows).cast_column("audio", datasets.Audio())
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(root / SUBSET))
    return root


# Phases of profile_gap's table that are paid once per run, whatever the items; the others are the items' own.
FIXED_PHASES = {"imports", "model load", "plots", "report (markdown, html)", "other", "data", "judge"}


CONFIGS = {"default": [], "separate+cache": ["--no-reuse-prompt-cache"],
           "separate": ["--no-reuse-prompt-cache", "--no-cache-audio-encoder"]}


def gap_argv(data_dir: Path, out: Path, limit: int, config: str, batch_size: int) -> list[str]:
    """``gap``'s arguments (the default organism run on the copy), without the program."""
    from speechlm_eval.embedded import embedded_models

    speech, text = embedded_models()
    argv = ["gap", "--model", str(speech), "--text-model", str(text), "--suite", f"voicebench:{SUBSET}",
            "--data-dir", str(data_dir), "--limit", str(limit), "--out", str(out), "--overwrite", "--threads", "1",
            "--max-new-tokens", "8", "--batch-size", str(batch_size)]
    return argv + CONFIGS[config]


def measure(data_dir: Path, tmp: Path, limit: int, config: str, args: argparse.Namespace) -> dict[str, float]:
    """Medians over ``args.repeats`` runs at ``limit`` items: wall seconds, peak RSS and peak anonymous memory (MiB),
    and the seconds of the per-item phases. Each run is ``gap`` under ``profile_gap.py``'s phase hooks (its child
    mode), which charge every second to one phase: the per-item phases' sum leaves out start-up, imports, model load,
    plots and report, whose run-to-run noise (seconds) would swamp a difference of whole-process times."""
    runs = []
    for r in range(args.repeats):
        phases = tmp / f"phases-{limit}-{config}-{r}.json"
        argv = [sys.executable, str(ROOT / "benchmarks" / "profile_gap.py"), "--child", str(phases), "--",
                *gap_argv(data_dir, tmp / f"run-{limit}-{config}", limit, config, args.batch_size)]
        seconds, rss, anon = timed_process(argv)
        table = json.loads(phases.read_text())["seconds"]
        runs.append((seconds, rss / 1024, anon / 1024, sum(v for k, v in table.items() if k not in FIXED_PHASES)))
    return {name: statistics.median(run[i] for run in runs)
            for i, name in enumerate(("seconds", "rss_mib", "anon_mib", "item_seconds"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64,
                        help="the same for every run, so a larger run has more batches, not larger ones (peak "
                             "memory grows with the batch: each row's log-mel window and encoder activations)")
    args = parser.parse_args()
    sizes = (100, 400, 800)
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; one torch thread; batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        data_dir = build_voicebench_copy(tmp / "voicebench", sizes[-1])
        rows = []
        for config in CONFIGS:
            m = {n: measure(data_dir, tmp, n, config, args) for n in sizes}

            def col(name: str, digits: int = 2) -> dict[int, float]:
                return {n: round(m[n][name], digits) for n in sizes}

            t, items = col("seconds"), col("item_seconds")
            row = {"config": config, "seconds": t, "item_seconds": items,
                   "time_ratio_800_100": round(t[800] / t[100], 2), "linear_bound": 9.2,
                   "item_ratio_800_100": round(items[800] / items[100], 2),
                   "slope_ratio": round(((items[800] - items[400]) / 400) / ((items[400] - items[100]) / 300), 2),
                   "ms_per_item_100_400": round(1000 * (items[400] - items[100]) / 300, 1),
                   "ms_per_item_400_800": round(1000 * (items[800] - items[400]) / 400, 1),
                   "peak_rss_mib": col("rss_mib", 1), "peak_anon_mib": col("anon_mib", 1),
                   "anon_kib_per_added_item": round((m[800]["anon_mib"] - m[100]["anon_mib"]) * 1024 / 700, 1),
                   "rss_kib_per_added_item": round((m[800]["rss_mib"] - m[100]["rss_mib"]) * 1024 / 700, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'config':<14} {'s@100':>6} {'s@800':>6} {'800/100':>7} {'items s@100/400/800':>21} {'800/100':>7} "
          f"{'slopes':>6} {'anon MiB 100/800':>17} {'KiB/item':>8} {'RSS MiB 100/800':>16}")
    for r in rows:
        t, i, a, m = r["seconds"], r["item_seconds"], r["peak_anon_mib"], r["peak_rss_mib"]
        print(f"{r['config']:<14} {t[100]:>6.2f} {t[800]:>6.2f} {r['time_ratio_800_100']:>6.2f}x "
              f"{i[100]:>6.2f}/{i[400]:>6.2f}/{i[800]:>6.2f} {r['item_ratio_800_100']:>6.2f}x {r['slope_ratio']:>5.2f}x "
              f"{a[100]:>8.1f}/{a[800]:<8.1f} {r['anon_kib_per_added_item']:>8.1f} {m[100]:>7.1f}/{m[800]:<8.1f}")


if __name__ == "__main__":
    main()
