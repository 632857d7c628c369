"""``speechlm-eval lm-eval ...``: lm-eval's own command line with the ``speechlm`` model registered.

lm-eval only knows the models of modules imported before it parses ``--model``, and it scans no plugin entry points,
so ``lm_eval --model speechlm`` cannot see ours; this command imports it first, then hands every argument to lm-eval
(``--model speechlm`` is added when no ``--model`` is given).
"""

from __future__ import annotations

import sys

import typer

HELP = ("lm-eval's command line (same arguments, e.g. `--model_args pretrained=PATH --tasks arc_easy`) with our "
        "`speechlm` model registered, so any lm-eval task scores a speech LLM's text path; --model defaults to "
        "speechlm and the device falls back to CPU without CUDA, as --model hf does.")


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's argv: its ``run`` subcommand and ``--model speechlm`` unless the user chose otherwise."""
    argv = list(args)
    if not argv or argv[0] not in ("run", "ls", "validate") and not argv[0].startswith("-h"):
        argv = ["run", *argv]
    if argv[0] == "run" and not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv[1:1] = ["--model", "speechlm"]
    return argv


def register(app: typer.Typer) -> None:
    @app.command("lm-eval", help=HELP, context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                          "help_option_names": []})
    def lm_eval(ctx: typer.Context) -> None:
        from speechlm_eval.lmeval.run import lm_eval_cli

        sys.argv = ["lm_eval", *lm_eval_argv(list(ctx.args))]
        lm_eval_cli()
