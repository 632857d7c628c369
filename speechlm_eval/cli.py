"""Command line: parses options and calls library functions (everything here is callable from Python too)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(
    help="Measure what a speech LLM lost when it learned to listen (forgetting, modality inequivalence).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
JUDGE_HELP = (
    "LLM judge for the open-ended subsets and sd-qa: openai:MODEL (any OpenAI-compatible endpoint; base URL from "
    "$SPEECHLM_EVAL_JUDGE_BASE_URL, key from $OPENAI_API_KEY; VoiceBench uses openai:gpt-4o-mini), hf:PATH (a local "
    "model), or none (those subsets are left unscored, with a note). Calls are cached on disk."
)


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def gap(
    model: Optional[str] = typer.Option(None, help="Speech LLM: hub id or local path. Omitted: the embedded model organism pair and its suite."),
    text_model: Optional[str] = typer.Option(None, help="Text LLM (the speech LLM's text backbone/teacher): hub id or local path. Omitted: forgetting is not measured."),
    suite: List[str] = typer.Option([], "--suite", help="Benchmark subsets, repeatable: 'voicebench:mmsu,openbookqa', 'voicebench:sd-qa@usa', 'voicebench', 'mmau', 'bundled'. Default: bundled."),
    out: Path = typer.Option(Path("runs/gap"), help="Run directory (records, manifest, results, report)."),
    resume: bool = typer.Option(False, help="Continue a killed run in --out without recomputing any record."),
    overwrite: bool = typer.Option(False, help="Delete an existing run in --out and start over."),
    limit: Optional[int] = typer.Option(None, min=1, help="Keep the first N items of each subset (smoke runs)."),
    batch_size: int = typer.Option(8, min=1, help="Prompts per generate call (padded left, sorted by length)."),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="New-token budget per answer (default 512; 8 for the embedded organism)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N. auto = this process's device under torchrun/accelerate, else CUDA if present, else CPU."),
    dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16. auto = checkpoint dtype on GPU, float32 on CPU."),
    seed: int = typer.Option(0, help="Seed for sampling, scoring fallbacks and bootstrap resampling."),
    model_family: Optional[str] = typer.Option(None, help="Force the speech LLM's family (default: from its config)."),
    text_model_family: Optional[str] = typer.Option(None, help="Force the text LLM's family (default: from its config)."),
    model_revision: Optional[str] = typer.Option(None, help="Hub revision (commit/tag) of --model."),
    text_model_revision: Optional[str] = typer.Option(None, help="Hub revision (commit/tag) of --text-model."),
    trust_remote_code: bool = typer.Option(False, help="Allow checkpoints' own Python code (only for sources you trust)."),
    data_dir: Optional[str] = typer.Option(None, help="Local VoiceBench copy (save_to_disk or the hub's parquet snapshot) instead of the HF hub."),
    voicebench_revision: Optional[str] = typer.Option(None, help="HF dataset revision of hlt-lab/voicebench (default: the pinned one)."),
    mmau_json: Optional[str] = typer.Option(None, help="MMAU mmau-test-mini.json (its sha256 is recorded)."),
    mmau_audio_dir: Optional[str] = typer.Option(None, help="Folder of MMAU test-mini <id>.wav clips."),
    tts_engine: str = typer.Option("espeak-ng", help="TTS engine for items that have text but no audio."),
    tts_voice: str = typer.Option("en-us", help="TTS voice."),
    tts_rate: int = typer.Option(160, help="TTS speaking rate (words per minute)."),
    arm: List[str] = typer.Option([], "--arm", help="Run only these arms (repeatable): text_llm_text, speech_llm_text, speech_llm_speech."),
    judge: str = typer.Option("none", help=JUDGE_HELP),
    diagnostics: bool = typer.Option(True, help="Judge-free diagnostics after the arms: per-token KL/JSD speech vs text and text LLM vs speech LLM, and the perception (transcription + WER) probe."),
    lm_eval_tasks: List[str] = typer.Option([], "--lm-eval-tasks", help="lm-eval tasks (repeatable or comma-separated): forgetting per task on both models' text paths; multiple_choice tasks are also scored by log-likelihood given the spoken vs typed question (inequivalence)."),
    lm_eval_include: Optional[str] = typer.Option(None, "--lm-eval-include", help="Folder of local lm-eval task YAMLs (offline use; only local tasks are indexed when all named tasks are found there)."),
    probe_instruction: Optional[str] = typer.Option(None, help="Instruction sent with the audio for the perception probe (default: 'Transcribe the speech in the audio exactly.')."),
) -> None:
    """Answer every item three ways (text LLM · text, speech LLM · text, speech LLM · speech) and report the gaps."""
    from speechlm_eval.gap import ConfigError, GapConfig, run_gap
    from speechlm_eval.records import ARMS

    config = GapConfig(
        out=out, model=model, text_model=text_model, model_family=model_family, text_model_family=text_model_family,
        model_revision=model_revision, text_model_revision=text_model_revision, suites=suite, data_dir=data_dir,
        voicebench_revision=voicebench_revision, mmau_json=mmau_json, mmau_audio_dir=mmau_audio_dir, resume=resume,
        overwrite=overwrite, limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device,
        dtype=dtype, seed=seed, trust_remote_code=trust_remote_code, tts_engine=tts_engine, tts_voice=tts_voice,
        tts_rate=tts_rate, arms=arm or ARMS, judge=judge,
        diagnostics=diagnostics, probe_instruction=probe_instruction,
        lm_eval_tasks=[t for spec in lm_eval_tasks for t in spec.split(",") if t], lm_eval_include=lm_eval_include,
    )
    try:
        run_dir = run_gap(config, console=console)
    except (ConfigError, ValueError, FileNotFoundError) as error:
        _fail(str(error))
    from speechlm_eval.distributed import process_state

    if process_state().is_main_process:
        console.print(f"[green]results:[/] {run_dir / 'results.json'}\n[green]report:[/]  {run_dir / 'report.md'}")
        typer.echo(str(run_dir / "report.md"))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A gap run directory."),
    judge: Optional[str] = typer.Option(None, help="Judge the open-ended/sd-qa responses first (see gap --judge)."),
) -> None:
    """Rebuild results.json, report.md and report.html from a run's records alone (no model is loaded)."""
    from speechlm_eval.report.build import build_report

    if not (run_dir / "manifest.json").exists():
        _fail(f"{run_dir} is not a run directory (no manifest.json)")
    if judge is not None:
        from speechlm_eval.judging import judge_run

        judge_run(run_dir, judge)
    build_report(run_dir)
    typer.echo(str(run_dir / "report.md"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def distill(ctx: typer.Context) -> None:
    """Repair a speech LLM by cross-modal distillation from its text LLM; report gaps before and after.

    Options: `speechlm-eval distill --help`. With no --student/--teacher it repairs the embedded model organism.
    """
    from speechlm_eval.distill.pipeline import main as distill_main

    try:
        report_path = distill_main(ctx.args)
    except ValueError as error:
        _fail(str(error))
    typer.echo(str(report_path))


from speechlm_eval.cli_extra import register as _register_extra  # noqa: E402 - score, check

_register_extra(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
