"""``python -m speechlm_eval.distill`` (also under ``accelerate launch -m`` / ``torchrun -m``): one distillation run.

The options are :class:`~speechlm_eval.distill.train.DistillConfig`'s fields, generated from it so the two cannot
drift; ``--full`` is shorthand for ``--no-lora`` (full fine-tune of the language model).
"""

from __future__ import annotations

import argparse
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from speechlm_eval.distill.train import DistillConfig, config_fields, distill


def _scalar_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(argparse ``type``, ``choices``) for a field's annotation (``X | None`` and ``Literal`` unwrapped)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), tuple(args)
    if args:  # Optional[X]
        return _scalar_type(args[0])
    if annotation is Path:
        return Path, None
    return annotation, None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m speechlm_eval.distill",
        description="Cross-modal knowledge distillation (T→T and S→T) from a text LLM into a speech LLM. Defaults "
        "marked 'our reading' are our decisions, not the paper's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    hints = typing.get_type_hints(DistillConfig)
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
            continue
        kind, choices = _scalar_type(hints[f.name])
        parser.add_argument(flag, type=kind, choices=choices, default=f.default, help=help_text,
                            required=bool(f.metadata.get("required")))
    parser.add_argument("--full", dest="lora", action="store_false", help="full fine-tune (same as --no-lora)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = DistillConfig(**vars(args))
    path = distill(config)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
