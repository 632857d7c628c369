"""``speechlm-eval distill`` as a library call: gap before, cross-modal distillation, gap after, and the before/after
report.

The before run is reused when it exists (``OUT/before``), the distillation resumes from its last train state, and the
after run scores ``OUT/checkpoint`` (or, with ``--no-merge``, ``OUT/adapter``) on the same suite with the same teacher as the text LLM.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

from speechlm_eval.distill.config import DEFAULT_EVAL_SUITE, DistillConfig, EvalConfig, our_reading_for, resolve_distill_config
from speechlm_eval.distill.train import distill

log = logging.getLogger(__name__)

def _gap(out: Path, model: str, text_model: str, evaluation: EvalConfig, seed: int) -> Path:
    from speechlm_eval.gap import GapConfig, run_gap

    config = GapConfig(out=out, model=model, text_model=text_model, suites=list(evaluation.suites),
                       limit=evaluation.eval_limit, batch_size=evaluation.eval_batch_size,
                       max_new_tokens=evaluation.eval_max_new_tokens, seed=seed,
                       device=evaluation.eval_device, resume=(out / "manifest.json").exists(),
                       notes=list(evaluation.notes), diagnostics=True)
    return run_gap(config)


def suite_items(suites: Sequence[str], limit: int | None) -> list[Any]:
    from speechlm_eval.data.suite import load_suite, parse_suite

    items, _ = load_suite([r for s in suites for r in parse_suite(s)], limit=limit)
    return items


def distill_and_compare(config: DistillConfig, evaluation: EvalConfig | None = None) -> Path:
    """Before gap → distill → after gap → comparison report in ``config.out``; returns the report path.

    With no student the embedded organism is repaired with its own data, suite and settings.
    """
    from speechlm_eval.report.before_after import write_before_after
    from speechlm_eval.rundir import portable_path

    evaluation = evaluation or EvalConfig()
    config = resolve_distill_config(config, evaluation)
    evaluation.suites = list(evaluation.suites) or [DEFAULT_EVAL_SUITE]
    from speechlm_eval.preflight import check_distill

    check_distill(config)  # before the first gap run loads a model
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    items = suite_items(evaluation.suites, evaluation.eval_limit)  # also the leakage check's evaluation items
    if config.overwrite:  # the before/after runs of an earlier distillation must not be resumed as if current
        for name in ("before", "after"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in ("comparison.json", "report.md", "report.html"):
            (out / name).unlink(missing_ok=True)
    log.info("distill 1/4: gap before distillation -> %s", out / "before")
    before = _gap(out / "before", config.student, config.teacher, evaluation, config.seed)
    checkpoint = out / ("adapter" if config.lora and not config.merge else "checkpoint")
    log.info("distill 2/4: distillation -> %s", checkpoint)
    finished = (checkpoint / "config.json").exists() or (checkpoint / "adapter_config.json").exists()
    if finished and (out / "manifest.json").exists() and not config.overwrite:
        pass  # a finished distillation: reuse it
    else:
        if (out / "manifest.json").exists() and not config.overwrite:
            config.resume = True
        checkpoint = distill(config, eval_items=items)
    log.info("distill 3/4: gap after distillation -> %s", out / "after")
    after = _gap(out / "after", str(checkpoint), config.teacher, evaluation, config.seed)

    def shown(path: Any) -> str:
        return str(portable_path(str(path), out))

    preamble = [f"- **Student** (before): `{shown(config.student)}`", f"- **Teacher** (text LLM): `{shown(config.teacher)}`",
                f"- **Distilled checkpoint**: `{shown(checkpoint)}`",
                f"- **Channels**: {config.channels}; loss {config.kind}, τ = {config.temperature}, "
                f"λ_TT = {config.lambda_tt}, λ_ST = {config.lambda_st}, CE = {config.ce}; "
                f"{'LoRA' if config.lora else 'full fine-tune'}; data {shown(config.data)}",
                "- Where the paper is silent, this run used (our reading, not the paper's): "
                + "; ".join(f"{k}: {v}" for k, v in our_reading_for(config).items()),
                *[f"- {n}" for n in evaluation.notes]]
    log.info("distill 4/4: before/after report -> %s", out / "report.md")
    write_before_after(out, before, after, preamble)
    return out / "report.md"
