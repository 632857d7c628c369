"""``speechlm-eval export``: a gap run in VoiceBench's, the VoiceBench leaderboard's, MMAU's or lm-eval's format."""

from __future__ import annotations

import typer

from speechlm_eval.cli.common import bad_input_exits
from speechlm_eval.cli.options import config_command
from speechlm_eval.report.export import ExportConfig

HELP = ("Write a gap run in another tool's format: voicebench ({model}-{data}-{split}-{modality}.jsonl, re-scorable "
        "with `speechlm-eval score voicebench` and VoiceBench's evaluate.py), voicebench-row (the leaderboard row), "
        "mmau (evaluation.py's input) or lm-eval (results + samples). Prints the files written.")


def export(config: ExportConfig) -> None:
    from speechlm_eval.report.export import export_run

    with bad_input_exits():
        written = export_run(config)
    for path in written:
        typer.echo(str(path))


def register(app: typer.Typer) -> None:
    config_command(app, "export", [ExportConfig], export, help=HELP, with_config_file=False)
