"""Judging a run's open-ended and sd-qa responses with an LLM judge, stored beside the records.

Judge outputs go to ``RUN_DIR/judgements/<arm>.jsonl`` (one row per item, keyed by the judged response's hash), and the
judge's identity into the manifest, so ``speechlm-eval report`` can rebuild the scores from files alone. Every judge
call is cached on disk: judging a run again makes no call.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speechlm_eval.records import write_canonical, write_json_atomic
from speechlm_eval.report.build import as_item, load_run
from speechlm_eval.scoring.judge import JUDGED_SCORERS, describe_judge, judge_arm_rows, load_judge


def judge_run(run_dir: Path, spec: str, *, seed: int = 0, device: str = "auto", dtype: str = "auto",
              cache_dir: Path | None = None) -> dict[str, Any]:
    """Judge every answered item of the judge-scored subsets in every arm; returns the judge's manifest entry."""
    run_dir = Path(run_dir)
    judge = load_judge(spec, seed=seed, device=device, dtype=dtype)
    description = describe_judge(judge)
    manifest, rows, records = load_run(run_dir)
    judged = [r for r in rows if r["scorer"] in JUDGED_SCORERS]
    if judge is not None and judged:
        items = [as_item(r) for r in judged]
        order = [r["id"] for r in judged]
        for arm, arm_records in records.items():
            arm_rows = judge_arm_rows(items, arm_records, judge, cache_dir)
            write_canonical(run_dir / "judgements" / f"{arm}.jsonl", arm_rows, order)
    manifest["judge"] = description
    write_json_atomic(run_dir / "manifest.json", manifest)
    return description


def judged_subsets(run_dir: Path) -> list[str]:
    """Subsets of a run that need a judge (for messages)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "items.jsonl").read_text().splitlines() if line]
    return sorted({r["subset"] for r in rows if r["scorer"] in JUDGED_SCORERS})
