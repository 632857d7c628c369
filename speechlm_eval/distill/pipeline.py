"""``speechlm-eval distill``: gap before, cross-modal distillation, gap after, and the before/after report.

The before run is reused when it exists (``OUT/before``), the distillation resumes from its last train state, and the
after run scores ``OUT/checkpoint`` on the same suite with the same teacher as the text LLM.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from speechlm_eval.distill.train import OUR_READING, DistillConfig, distill


def _gap(out: Path, model: str, text_model: str, args: argparse.Namespace, notes: list[str]) -> Path:
    from speechlm_eval.gap import GapConfig, run_gap

    config = GapConfig(out=out, model=model, text_model=text_model, suites=args.suite, limit=args.eval_limit,
                       batch_size=args.eval_batch_size, max_new_tokens=args.eval_max_new_tokens, seed=args.seed,
                       device=args.eval_device, resume=(out / "manifest.json").exists(), notes=list(notes),
                       diagnostics=True)
    return run_gap(config)


def suite_items(suites: Sequence[str], limit: int | None) -> list[Any]:
    from speechlm_eval.data.suite import load_suite, parse_suite

    items, _ = load_suite([r for s in suites for r in parse_suite(s)], limit=limit)
    return items


def distill_and_compare(config: DistillConfig, args: argparse.Namespace, notes: list[str]) -> Path:
    """Before gap → distill → after gap → comparison report in ``config.out``; returns the report path."""
    from speechlm_eval.report.before_after import write_before_after

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    items = suite_items(args.suite, args.eval_limit)  # also the leakage check's evaluation items
    if config.overwrite:  # the before/after runs of an earlier distillation must not be resumed as if current
        import shutil

        for name in ("before", "after"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("comparison.json", "report.md", "report.html"):
            (out / name).unlink(missing_ok=True)
    before = _gap(out / "before", config.student, config.teacher, args, notes)
    checkpoint = out / "checkpoint"
    if (checkpoint / "config.json").exists() and (out / "manifest.json").exists() and not config.overwrite:
        pass  # a finished distillation: reuse it
    else:
        if (out / "manifest.json").exists() and not config.overwrite:
            config.resume = True
        checkpoint = distill(config, eval_items=items)
    after = _gap(out / "after", str(checkpoint), config.teacher, args, notes)
    preamble = [f"- **Student** (before): `{config.student}`", f"- **Teacher** (text LLM): `{config.teacher}`",
                f"- **Distilled checkpoint**: `{checkpoint}`",
                f"- **Channels**: {config.channels}; loss {config.kind}, τ = {config.temperature}, "
                f"λ_TT = {config.lambda_tt}, λ_ST = {config.lambda_st}, CE = {config.ce}; "
                f"{'LoRA' if config.lora else 'full fine-tune'}; data {config.data}",
                "- Defaults that are our reading of the paper, not the paper's: "
                + ", ".join(sorted(OUR_READING)), *[f"- {n}" for n in notes]]
    write_before_after(out, before, after, preamble)
    return out / "report.md"


def add_pipeline_options(parser: argparse.ArgumentParser) -> None:
    """The before/after evaluation options added to the distillation parser."""
    group = parser.add_argument_group("before/after evaluation")
    group.add_argument("--suite", action="append", default=None,
                       help="evaluation suite(s) for the before/after gap runs (as `gap --suite`; default: bundled)")
    group.add_argument("--eval-limit", type=int, default=None, help="first N items per subset")
    group.add_argument("--eval-batch-size", type=int, default=8, help="gap batch size")
    group.add_argument("--eval-max-new-tokens", type=int, default=None, help="gap new-token budget")
    group.add_argument("--eval-device", default="auto", help="device for the gap runs")


# What ``speechlm-eval distill`` uses for the embedded organism where the user sets nothing (each still overridable).
# The organism's distillation set is small (every non-evaluation fact, ~290 MCQs) and its models tiny, so the run is a
# full fine-tune for many epochs at a higher learning rate than the 7B defaults; S→T speaks the questions in a training
# voice, so the evaluation voice stays unheard by every training stage.
ORGANISM_DISTILL_DEFAULTS: dict[str, Any] = {
    "targets": "teacher",
    "lora": False,
    "lr": 3e-4,
    "epochs": 24,
    "batch_size": 24,
    "warmup_ratio": 0.05,
    "tts_voice": "en-gb",
    "teacher_batch_size": 32,
}


def main(argv: Sequence[str] | None = None) -> Path:
    """Parse ``speechlm-eval distill`` options; with no --student/--teacher, repair the embedded default pair."""
    from speechlm_eval.distill.__main__ import build_parser

    parser = build_parser()
    parser.prog = "speechlm-eval distill"
    parser.description = ("Repair a speech LLM by cross-modal knowledge distillation (T→T and S→T) from its text "
                          "LLM teacher, then report forgetting and inequivalence before and after. With no "
                          "--student/--teacher it repairs the embedded model organism with its own data and "
                          "defaults (" + ", ".join(f"{k}={v}" for k, v in ORGANISM_DISTILL_DEFAULTS.items())
                          + "). " + (parser.description or ""))
    for action in parser._actions:  # student/teacher/out are optional here: the embedded default fills them
        if action.dest in ("student", "teacher", "out"):
            action.required = False
    add_pipeline_options(parser)
    field_defaults = {key: parser.get_default(key) for key in (*ORGANISM_DISTILL_DEFAULTS, "data")}
    parser.set_defaults(**{key: None for key in field_defaults})  # None = not given on the command line
    for action in parser._actions:
        if action.dest in field_defaults:  # "%(default).0s" renders empty and stops argparse appending "None"
            organism = ORGANISM_DISTILL_DEFAULTS.get(action.dest, "its distill.jsonl")
            action.help = (f"{action.help} (default: {field_defaults[action.dest]}; embedded organism: {organism})"
                           "%(default).0s")
    args = parser.parse_args(argv)
    notes: list[str] = []
    if args.student is None:
        from speechlm_eval import defaults

        if args.teacher is not None:
            parser.error("--teacher needs --student (the embedded default brings its own pair)")
        speech, text = defaults.embedded_models()
        args.student, args.teacher = str(speech), str(text)
        notes.append(defaults.EMBEDDED_NOTE)
        organism = {**ORGANISM_DISTILL_DEFAULTS, "data": str(defaults.embedded_distill_data())}
        for key, value in organism.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.leakage_suite is None:
            args.leakage_suite = defaults.EMBEDDED_SUITE
        if args.eval_max_new_tokens is None:
            args.eval_max_new_tokens = defaults.EMBEDDED_MAX_NEW_TOKENS
        args.suite = args.suite or [defaults.EMBEDDED_SUITE]
    elif args.teacher is None:
        parser.error("--teacher is required with --student (a text LLM with the student's tokenizer)")
    for key, value in field_defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.out = args.out or Path("runs/distill")
    args.suite = args.suite or ["bundled"]
    pipeline_keys = {"suite", "eval_limit", "eval_batch_size", "eval_max_new_tokens", "eval_device"}
    config = DistillConfig(**{k: v for k, v in vars(args).items() if k not in pipeline_keys})
    return distill_and_compare(config, args, notes)
