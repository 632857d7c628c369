"""Commands ``score`` (re-score official-format outputs), ``check`` (CI gate on two runs) and ``organism build``,
mounted by ``cli.py``.

They only parse options and call :mod:`speechlm_eval.scoring.rescore`, :mod:`speechlm_eval.report.check` and
:mod:`speechlm_eval.organism.builder`.
Exit codes: 0 ok, 1 ``check`` found a regression, 2 unusable input.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, NoReturn, Optional

import typer

EXIT_REGRESSION = 1
EXIT_BAD_INPUT = 2


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(EXIT_BAD_INPUT)


def _print_json(obj: Any) -> None:
    from speechlm_eval.scoring.rescore import json_safe

    typer.echo(json.dumps(json_safe(obj), ensure_ascii=False, allow_nan=False))


def score_voicebench(
    file: Path = typer.Argument(..., help="VoiceBench main.py output (.jsonl: dataset columns + `response`); for "
                                          "open/qa subsets the api_judge.py `result-` file (with `score`)."),
    subset: str = typer.Option(..., "--subset", help="VoiceBench subset the file answers (openbookqa, mmsu, bbh, "
                                                     "advbench, ...); selects the official scorer."),
    per_item: Optional[Path] = typer.Option(None, "--per-item", help="Write one JSON line per input item (index, id, "
                                                                     "extracted, parsed, correct, score)."),
    seed: int = typer.Option(0, help="Seed of the draw that replaces upstream's unseeded random answer for unparsed "
                                     "responses."),
    split: Optional[str] = typer.Option(None, help="Split name used in item ids (default: the subset's own split, "
                                                   "or 'all')."),
) -> None:
    """Score a VoiceBench output file with the official rules; prints one JSON object with the official metrics."""
    from speechlm_eval.scoring.rescore import RescoreError, rescore_voicebench, write_per_item

    try:
        result = rescore_voicebench(file, subset, seed=seed, split=split)
    except RescoreError as error:
        _fail(str(error))
    if per_item is not None:
        write_per_item(per_item, result.per_item)
    _print_json(result.metrics)


def score_mmau(
    file: Path = typer.Argument(..., help="MMAU JSON (the benchmark list, predictions under `model_output`)."),
    per_item: Optional[Path] = typer.Option(None, "--per-item", help="Write one JSON line per input item (score null "
                                                                     "where the official script skips it)."),
) -> None:
    """Score an MMAU test-mini file as evaluation.py does; prints total_accuracy, n and the per-group accuracies (%)."""
    from speechlm_eval.scoring.rescore import RescoreError, rescore_mmau, write_per_item

    try:
        result = rescore_mmau(file)
    except RescoreError as error:
        _fail(str(error))
    if per_item is not None:
        write_per_item(per_item, result.per_item)
    _print_json(result.metrics)


def check(
    baseline: Path = typer.Option(..., help="Run directory of the released (baseline) model."),
    candidate: Path = typer.Option(..., help="Run directory of the candidate model, on the same items."),
    max_drop: float = typer.Option(1.0, help="Largest tolerated drop of a score (or growth of a gap), in points on "
                                             "a 0-100 scale: accuracies in %, advbench refusal_rate x100, open-ended "
                                             "1-5 judge means x20."),
    alpha: float = typer.Option(0.05, help="Significance level of the two-sided paired test (McNemar / Wilcoxon); "
                                           "CIs are at 1-alpha."),
    subset: List[str] = typer.Option([], "--subset", help="Compare only these subsets (repeatable; default: every "
                                                          "subset scored in both runs)."),
) -> None:
    """CI gate: exit 1 when a subset's score drops (or a gap grows) by more than --max-drop with p < --alpha.

    Prints a Markdown table (also appended to $GITHUB_STEP_SUMMARY when set); exit 2 on unusable runs.
    """
    from speechlm_eval.report.check import CheckError, append_step_summary, compare_runs, render_check_markdown

    try:
        report = compare_runs(baseline, candidate, max_drop=max_drop, alpha=alpha, subsets=subset or None)
    except CheckError as error:
        _fail(str(error))
    markdown = render_check_markdown(report)
    typer.echo(markdown, nl=False)
    append_step_summary(markdown)
    if report.failed:
        raise typer.Exit(EXIT_REGRESSION)


def organism_build(
    out: Path = typer.Option(..., help="Output directory (text_llm/, speech_llm/, suite, distill data, organism.json)."),
    seed: int = typer.Option(0, help="World, initialisation and data-order seed; the shipped default is seed 0."),
    micro: bool = typer.Option(False, help="A seconds-long smoke build with meaningless weights (for tests)."),
    quiet: bool = typer.Option(False, help="No progress bars."),
) -> None:
    """Build the model organism from scratch: world, tokenizer, text LLM, clips, speech LLM (stages A and B).

    Deterministic for a seed on a given machine and library set; about 15 minutes on 2 CPU cores. Prints the build's
    timings, sizes and measured gaps; evaluate it with `speechlm-eval gap --model OUT/speech_llm --text-model
    OUT/text_llm --suite organism:organism_mcq@seedN`.
    """
    from speechlm_eval.organism.builder import OrganismSpec, build, micro_spec

    if espeak_missing():
        _fail("espeak-ng is not installed (apt-get install -y espeak-ng): the organism's speech data needs it")
    paths = build(out, seed=seed, spec=micro_spec() if micro else OrganismSpec(), progress=not quiet)
    summary = json.loads(paths.summary.read_text())
    typer.echo(json.dumps({k: summary.get(k) for k in ("timings_s", "sizes", "measurements")}, indent=1))
    typer.echo(str(paths.summary))


def espeak_missing() -> bool:
    import shutil

    return shutil.which("espeak-ng") is None


def register(app: typer.Typer) -> None:
    """Add ``score voicebench``, ``score mmau``, ``check`` and ``organism build`` to ``app``."""
    score_app = typer.Typer(help="Re-score outputs already written in the official VoiceBench / MMAU formats.",
                            no_args_is_help=True)
    score_app.command("voicebench")(score_voicebench)
    score_app.command("mmau")(score_mmau)
    app.add_typer(score_app, name="score")
    app.command("check")(check)
    organism_app = typer.Typer(help="The model organism: a tiny text LLM + speech LLM pair that shows forgetting and "
                               "inequivalence (the embedded default).", no_args_is_help=True)
    organism_app.command("build")(organism_build)
    app.add_typer(organism_app, name="organism")
