"""``speechlm-eval families``: the model families this installation can load, and what each supports."""

from __future__ import annotations

from dataclasses import dataclass

import typer

from speechlm_eval.cli.options import config_command


@dataclass
class FamiliesConfig:
    """No options: the command lists the registry."""


def families(_: FamiliesConfig) -> None:
    from speechlm_eval.models.registry import FAMILIES

    typer.echo("| family | model_type | audio | supports | text backbone | notes |")
    typer.echo("|---|---|---|---|---|---|")
    for name, family in FAMILIES.items():
        typer.echo(f"| {name} | {', '.join(family.model_types) or 'any causal LM'} | "
                   f"{'yes' if family.accepts_audio else 'no'} | {', '.join(family.capabilities)} | "
                   f"{family.backbone or '–'} | {family.notes} |")


def register(app: typer.Typer) -> None:
    config_command(app, "families", [FamiliesConfig], families, with_config_file=False,
                   help="List the model families (model_type values, audio input, what each supports, the public "
                        "text checkpoint that is its backbone).")
