"""Choosing the alignment channels' hyper-parameters on the organism's tuning split, never on its evaluation facts.

The tuning split (``organism:organism_dev@seedN``, :func:`~speechlm_eval.data.organism_world.dev_facts`) is a third
of the distillation-only facts, balanced over attributes: 48 facts the text LLM learned and the speech LLM never heard
spoken, as the 144 evaluation facts. For tuning they are taken out of the distillation data (and the leakage check
runs against them), each trial is trained on the rest, and scored by ``gap`` on the tuning split alone.

Each trial is T→T plus one alignment channel at one setting; per channel the setting chosen is the one with the
smallest inequivalence on the tuning split (ties: the earlier, simpler trial). The search, every trial's numbers and
the choice go to ``OUT/tuning.{json,md}``; the evaluation arms then use the chosen settings
(:data:`speechlm_eval.experiments.organism.ALIGNMENT_ARMS`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from speechlm_eval.data.organism_world import DEV_SUBSET, dev_facts, make_world

# name -> overrides of the organism's distill defaults (l4 = λ 4). "kd_tt" is the reference each channel is added to.
TRIALS: dict[str, dict[str, Any]] = {
    "kd_tt": {"channels": "tt"},
    "tt_hidden_l1_last": {"channels": "tt,st_hidden", "lambda_hidden": 1.0, "align_layers": "-1"},
    "tt_hidden_l4_last": {"channels": "tt,st_hidden", "lambda_hidden": 4.0, "align_layers": "-1"},
    "tt_hidden_l1_both": {"channels": "tt,st_hidden", "lambda_hidden": 1.0, "align_layers": "1,2"},
    "tt_prefix_l1": {"channels": "tt,st_prefix", "lambda_prefix": 1.0},
    "tt_prefix_l4": {"channels": "tt,st_prefix", "lambda_prefix": 4.0},
    "tt_self_l1": {"channels": "tt,st_self", "lambda_self": 1.0},
    "tt_self_l4": {"channels": "tt,st_self", "lambda_self": 4.0},
}
CHANNEL_OF = {"st_hidden": "hidden", "st_prefix": "prefix", "st_self": "self"}


@dataclass
class TuningConfig:
    """``speechlm-eval organism tune``: which build, where the trials go, which trials."""

    out: Path = field(metadata={"help": "Output directory (trials, tuning.{json,md})."})
    build: Path = field(metadata={"help": "The organism build directory to tune on (the shipped seed-0 build: "
                                          "`python -c 'import speechlm_eval.embedded as e; print(e.embedded_dir())'`)."})
    trials: list[str] = field(default_factory=list, metadata={
        "help": f"Only these trials (repeatable; default: all of {', '.join(TRIALS)}).", "flag": "--trial"})


def tune(config: TuningConfig) -> Path:
    """Run the search (resumable: a trial whose checkpoint and gap run exist is read back); returns ``tuning.md``."""
    unknown = [t for t in config.trials if t not in TRIALS]
    if unknown:
        raise ValueError(f"unknown trial(s) {unknown}; trials are {list(TRIALS)}")
    run_tuning(Path(config.build), Path(config.out), config.trials or list(TRIALS))
    return Path(config.out) / "tuning.md"


def tuning_data(distill_file: Path, seed: int, out: Path) -> tuple[Path, int]:
    """The build's distillation data without the tuning facts, written to ``out``; returns (path, rows kept)."""
    held_out = {f.key for f in dev_facts(make_world(seed))}
    rows = [json.loads(line) for line in distill_file.read_text().splitlines() if line.strip()]
    kept = [r for r in rows if (r.get("entity"), r.get("attribute")) not in held_out]
    if len(kept) == len(rows):
        raise ValueError(f"{distill_file}: no row names a tuning fact (entity/attribute columns missing?)")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))
    return out, len(kept)


def run_tuning(build: Path, out: Path, trials: Sequence[str]) -> dict[str, Any]:
    from speechlm_eval.experiments.organism import _gap, train_distilled
    from speechlm_eval.organism.layout import paths_for
    from speechlm_eval.report.before_after import before_after

    paths = paths_for(build)
    seed = int(json.loads(paths.summary.read_text())["seed"])
    suite = f"organism:{DEV_SUBSET}@seed{seed}"
    data, n_rows = tuning_data(paths.distill, seed, out / "distill_without_dev.jsonl")
    before = _gap(out / "before", paths.speech_llm, paths.text_llm, suite, diagnostics=False)
    rows = [trial_row("before", None, before, None, out)]
    for name in trials:
        base = out / name
        checkpoint = train_distilled(build, base, seed, TRIALS[name], data=data, leakage_suite=suite)
        after = _gap(base / "gap", checkpoint, paths.text_llm, suite, diagnostics=False)
        rows.append(trial_row(name, TRIALS[name], after, before_after(before, after), out))
    summary = {"schema": "speechlm-eval/organism-tuning/v1", "seed": seed, "suite": suite,
               "distill_rows": n_rows, "rows": rows, "chosen": choose(rows)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "tuning.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out / "tuning.md").write_text(render_tuning(summary))
    return summary


def trial_row(name: str, overrides: dict[str, Any] | None, run: Path, change: dict[str, Any] | None,
              out: Path) -> dict[str, Any]:
    from speechlm_eval.experiments.organism import arm_row

    row = arm_row(-1, name, run, change, out, subset_name=DEV_SUBSET)
    row.pop("seed")
    row["overrides"] = overrides
    return row


def choose(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """Per alignment channel, the trial with the smallest tuning-split inequivalence (first wins a tie)."""
    chosen: dict[str, str] = {}
    for channel in CHANNEL_OF:
        mine = [r for r in rows if r["overrides"] and channel in r["overrides"]["channels"].split(",")]
        if mine:
            chosen[channel] = min(mine, key=lambda r: r["inequivalence"]["value"])["arm"]
    return chosen


def render_tuning(summary: dict[str, Any]) -> str:
    from speechlm_eval.experiments.organism import _ci

    lines = [f"# Alignment channels: search on the tuning split (seed {summary['seed']})", "",
             f"Tuning suite `{summary['suite']}` (48 distillation-only facts held out of distillation; the 144 "
             f"evaluation facts are not used). Each trial is trained on the other {summary['distill_rows']} "
             "distillation rows at the organism's `distill` defaults plus its overrides. Gaps and changes in points, "
             "paired bootstrap 95% CIs.", "",
             "| trial | overrides | speech LLM typed | spoken | forgetting | Δ forgetting (p) | inequivalence "
             "| Δ inequivalence (p) |", "|" + "---|" * 8]
    for r in summary["rows"]:
        acc = r["accuracy"]
        overrides = ", ".join(f"{k}={v}" for k, v in sorted((r["overrides"] or {}).items())) or "–"
        cells = [r["arm"], overrides, f"{acc.get('speech_llm_text', float('nan')):.3f}",
                 f"{acc.get('speech_llm_speech', float('nan')):.3f}"]
        for gap in ("forgetting", "inequivalence"):
            cells.append(_ci(r[gap]))
            change = r.get(f"{gap}_change")
            cells.append(f"{_ci(change, 'change')} (p={change['p_value']:.3g})" if change else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Chosen (smallest tuning-split inequivalence per channel): " + "; ".join(
        f"`{channel}`: {trial}" for channel, trial in summary["chosen"].items()), ""]
    return "\n".join(lines)
