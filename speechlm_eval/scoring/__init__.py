"""Scorers that reproduce the official VoiceBench and MMAU rules; pure functions of (item, response), no model."""

import importlib

BUILTIN_SCORER_MODULES = ("mcq", "bbh", "harm", "mmau", "ifeval", "open_ended", "qa")


def load_builtin_scorers() -> None:
    """Import the built-in scorer modules (each registers itself)."""
    for name in BUILTIN_SCORER_MODULES:
        importlib.import_module(f"speechlm_eval.scoring.{name}")
