"""The organism's distillation experiment: KD with both channels, each channel alone, two controls and the alignment
channels, per seed.

For each organism build (one per seed) the speech LLM is repaired in each arm, each then scored by ``gap`` on that
seed's suite, paired with the build's own "before" run:

- ``kd_both`` — ``speechlm-eval distill``'s organism defaults (T→T and S→T);
- ``kd_tt`` / ``kd_st`` — the same with one channel (the paper's ablations);
- ``sft_teacher_labels`` — control: the same data, channels and steps, cross-entropy on the teacher's labels, no KL;
- ``more_speech_training`` — control: stage B continued for the same number of optimizer steps, no teacher;
- ``align_hidden`` / ``align_prefix`` / ``align_self`` — one alignment channel alone
  (:mod:`speechlm_eval.distill.alignment`), and ``kd_tt_align_*`` the same beside T→T, at the settings chosen on the
  tuning split (:mod:`speechlm_eval.experiments.tuning`).

The summary (``experiments.json`` / ``experiments.md``) lists per seed and arm the typed and spoken accuracy, the two
gaps with 95% CIs, and each gap's paired change against "before" (CI, p-value), as :mod:`report.before_after` computes
it. Nothing is tuned on the evaluation suite: every arm uses settings fixed before it was run (the alignment arms' on the
tuning split).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from speechlm_eval import rundir

ARMS: dict[str, dict[str, Any] | None] = {
    "kd_both": {"channels": "tt,st"},
    "kd_tt": {"channels": "tt"},
    "kd_st": {"channels": "st"},
    "sft_teacher_labels": {"channels": "tt,st", "lambda_tt": 0.0, "lambda_st": 0.0, "ce": 1.0},
    "more_speech_training": None,  # organism stage B continued, no teacher
}
# The alignment channels (speechlm_eval.distill.alignment): each alone, and each beside T→T (which repairs forgetting).
ALIGNMENT_ARMS: dict[str, dict[str, Any]] = {
    "align_hidden": {"channels": "st_hidden"},
    "align_prefix": {"channels": "st_prefix"},
    "align_self": {"channels": "st_self"},
    "kd_tt_align_hidden": {"channels": "tt,st_hidden"},
    "kd_tt_align_prefix": {"channels": "tt,st_prefix"},
    "kd_tt_align_self": {"channels": "tt,st_self"},
}
ALL_ARMS: dict[str, dict[str, Any] | None] = {**ARMS, **ALIGNMENT_ARMS}
GAPS = tuple(rundir.GAPS)


@dataclass
class ExperimentsConfig:
    """``speechlm-eval organism experiments``: which builds, which arms, where the runs and the summary go."""

    out: Path = field(metadata={"help": "Output directory (runs, experiments.{json,md})."})
    builds: list[Path] = field(default_factory=list, metadata={
        "help": "An organism build directory (repeatable, one per seed).", "flag": "--build"})
    combine: list[Path] = field(default_factory=list, metadata={
        "help": "Instead of running: merge the experiments.json of earlier --out directories (repeatable)."})
    arms: list[str] = field(default_factory=list, metadata={
        "help": f"Only these arms (repeatable; default: all of {', '.join(ALL_ARMS)}).", "flag": "--arm"})


def experiments(config: ExperimentsConfig) -> Path:
    """Run (or combine) the experiment; returns the path of ``experiments.md``."""
    if config.combine:
        combine(config.combine, config.out)
    else:
        if not config.builds:
            raise ValueError("name at least one organism build (--build DIR) or earlier runs to --combine")
        unknown = [a for a in config.arms if a not in ALL_ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; arms are {list(ALL_ARMS)}")
        run_experiments(config.builds, config.out, config.arms or tuple(ALL_ARMS))
    return Path(config.out) / "experiments.md"


def _gap(out: Path, model: Path, text_model: Path, suite: str, diagnostics: bool) -> Path:
    from speechlm_eval.embedded import EMBEDDED_MAX_NEW_TOKENS
    from speechlm_eval.gap import GapConfig, run_gap

    config = GapConfig(out=out, model=str(model), text_model=str(text_model), suites=[suite],
                       max_new_tokens=EMBEDDED_MAX_NEW_TOKENS, batch_size=16, device="cpu",
                       resume=(out / "manifest.json").exists(), diagnostics=diagnostics)
    return run_gap(config)


def distill_steps(n_examples: int, batch_size: int, epochs: int) -> int:
    return math.ceil(n_examples / batch_size) * epochs


def run_arm(name: str, build: Path, out: Path, seed: int, suite: str) -> Path:
    """Train one arm (skipped when its checkpoint exists) and return the checkpoint directory."""
    from speechlm_eval.embedded import ORGANISM_DISTILL_DEFAULTS
    from speechlm_eval.organism.layout import paths_for

    paths = paths_for(build)
    checkpoint = out / "checkpoint"
    if (checkpoint / "config.json").exists():
        return checkpoint
    overrides = ALL_ARMS[name]
    if overrides is None:
        from speechlm_eval.experiments.controls import continue_speech_training

        n = sum(1 for line in paths.distill.read_text().splitlines() if line.strip())
        steps = distill_steps(n, ORGANISM_DISTILL_DEFAULTS["batch_size"], ORGANISM_DISTILL_DEFAULTS["epochs"])
        return continue_speech_training(build, checkpoint, steps)
    return train_distilled(build, out, seed, overrides, data=paths.distill, leakage_suite=suite)


def train_distilled(build: Path, out: Path, seed: int, overrides: dict[str, Any], *, data: Path,
                    leakage_suite: str) -> Path:
    """``distill`` at the organism's defaults with ``overrides`` on ``data``, checked for leakage against
    ``leakage_suite``; the trained model ends in ``out/checkpoint`` (skipped when it exists, resumed when a killed
    training left its train states in ``out/train``)."""
    from speechlm_eval.distill.config import DistillConfig
    from speechlm_eval.distill.train import distill
    from speechlm_eval.embedded import ORGANISM_DISTILL_DEFAULTS
    from speechlm_eval.organism.layout import paths_for

    paths = paths_for(build)
    checkpoint = out / "checkpoint"
    if (checkpoint / "config.json").exists():
        return checkpoint
    # A training killed mid-run (its manifest written, no checkpoint yet) continues from its last train state.
    config = DistillConfig(student=str(paths.speech_llm), teacher=str(paths.text_llm), out=out / "train",
                           data=str(data), seed=seed, leakage_suite=leakage_suite,
                           resume=(out / "train" / "manifest.json").exists(),
                           **{**ORGANISM_DISTILL_DEFAULTS, **overrides})
    trained = distill(config)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    trained.rename(checkpoint)
    return checkpoint


def run_experiments(builds: Sequence[Path], out: Path, arms: Sequence[str] = tuple(ARMS)) -> dict[str, Any]:
    """Every arm on every build; writes ``out/experiments.{json,md}`` and returns the summary. Resumable."""
    from speechlm_eval.organism.layout import paths_for
    from speechlm_eval.report.before_after import before_after

    rows: list[dict[str, Any]] = []
    for build in builds:
        paths = paths_for(build)
        seed = int(json.loads(paths.summary.read_text())["seed"])
        suite = f"organism:organism_mcq@seed{seed}"
        base = out / f"seed{seed}"
        before = _gap(base / "before", paths.speech_llm, paths.text_llm, suite, diagnostics=True)
        rows.append(arm_row(seed, "before", before, None, out))
        for name in arms:
            checkpoint = run_arm(name, Path(build), base / name, seed, suite)
            after = _gap(base / name / "gap", checkpoint, paths.text_llm, suite, diagnostics=True)
            rows.append(arm_row(seed, name, after, before_after(before, after), out))
    summary = {"schema": "speechlm-eval/organism-experiments/v1",
               "arms": {k: v for k, v in ALL_ARMS.items() if k in arms}, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiments.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out / "experiments.md").write_text(render_experiments(summary))
    return summary


def combine(summaries: Sequence[Path], out: Path) -> dict[str, Any]:
    """Merge the ``experiments.json`` of runs made separately (e.g. one process per seed) into ``out``."""
    rows: list[dict[str, Any]] = []
    for path in summaries:
        part = json.loads((Path(path) / "experiments.json").read_text())
        rows += [{**r, "run": f"{Path(path).name}/{r['run']}"} for r in part["rows"]]
    seen = {r["arm"] for r in rows}
    summary = {"schema": "speechlm-eval/organism-experiments/v1",
               "arms": {k: v for k, v in ALL_ARMS.items() if k in seen}, "rows": sorted(rows, key=lambda r: r["seed"])}
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiments.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (out / "experiments.md").write_text(render_experiments(summary))
    return summary


def arm_row(seed: int, arm: str, run: Path, change: dict[str, Any] | None, out: Path,
            subset_name: str = "organism_mcq") -> dict[str, Any]:
    """One table row: accuracies, gaps with CIs and (for repaired arms) each gap's paired change vs before."""
    results = json.loads((run / "results.json").read_text())
    subset = results["subsets"][subset_name]
    row: dict[str, Any] = {"seed": seed, "arm": arm, "run": run.relative_to(out).as_posix(),
                           "accuracy": {a: subset["arms"][a]["score"] / 100.0 for a in subset["arms"]}}
    for gap in GAPS:
        row[gap] = {k: subset[gap][k] for k in ("value", "ci_low", "ci_high", "p_value")}
        if change is not None:
            c = change["subsets"][subset_name]["gaps"][gap]
            row[f"{gap}_change"] = {k: c[k] for k in ("change", "ci_low", "ci_high", "p_value", "recovered")}
    perception = results.get("diagnostics", {}).get("perception", {}).get("subsets", {}).get(subset_name, {})
    row["key_phrase_heard"] = perception.get("key_phrase_heard")
    return row


def _ci(entry: dict[str, Any] | None, key: str = "value") -> str:
    if not entry:
        return "–"
    return f"{entry[key]:+.1f} [{entry['ci_low']:+.1f}, {entry['ci_high']:+.1f}]"


def render_experiments(summary: dict[str, Any]) -> str:
    lines = ["# Organism distillation experiment: KD, its ablations, two controls and the alignment channels", "",
             "Per seed (one organism build each), 144 held-out evaluation questions, held-out voice. Gaps and changes "
             "in points (0–100) with paired bootstrap 95% CIs; change = gap after − gap before (negative = "
             "smaller gap), p from the paired test of `speechlm-eval check`. Accuracies are fractions.", "",
             "| seed | arm | text LLM typed | speech LLM typed | speech LLM spoken | forgetting | Δ forgetting (p) "
             "| inequivalence | Δ inequivalence (p) | entity heard |", "|" + "---|" * 10]
    for r in summary["rows"]:
        acc = r["accuracy"]
        cells = [str(r["seed"]), r["arm"], f"{acc.get('text_llm_text', float('nan')):.3f}",
                 f"{acc.get('speech_llm_text', float('nan')):.3f}", f"{acc.get('speech_llm_speech', float('nan')):.3f}"]
        for gap in GAPS:
            cells.append(_ci(r[gap]))
            change = r.get(f"{gap}_change")
            cells.append(f"{_ci(change, 'change')} (p={change['p_value']:.3g})" if change else "–")
        heard = r.get("key_phrase_heard")
        cells.append(f"{100 * heard:.1f}%" if heard is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    lines += seed_mean_lines(summary["rows"])
    lines += ["", "Arms (overrides of the organism's `distill` defaults): " + "; ".join(
        f"`{k}` = " + (", ".join(f"{o}={v[o]}" for o in sorted(v)) if v is not None else "stage B continued, no teacher")
        for k, v in sorted(summary["arms"].items())), ""]
    return "\n".join(lines)


def seed_mean_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per arm, the mean over seeds of each gap's change, with the per-seed values and how many were significant."""
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) < 2:
        return []
    lines = ["", f"Mean over the {len(seeds)} seeds (points; per-seed changes in brackets, * = paired p < 0.05):", "",
             "| arm | Δ forgetting | Δ inequivalence | speech LLM typed | speech LLM spoken |", "|---|---|---|---|---|"]
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if a != "before"]
    for arm in ["before", *arms]:
        mine = [r for r in rows if r["arm"] == arm]
        cells = [arm]
        for gap in GAPS:
            changes = [r.get(f"{gap}_change") for r in mine]
            if any(c is None for c in changes):
                cells.append("–")
                continue
            values = ", ".join(f"{c['change']:+.1f}{'*' if c['p_value'] < 0.05 else ''}" for c in changes)
            cells.append(f"{sum(c['change'] for c in changes) / len(changes):+.1f} ({values})")
        for key in ("speech_llm_text", "speech_llm_speech"):
            accs = [r["accuracy"][key] for r in mine]
            cells.append(f"{sum(accs) / len(accs):.3f} ({', '.join(f'{a:.3f}' for a in accs)})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines
