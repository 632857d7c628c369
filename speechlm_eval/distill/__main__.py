"""``python -m speechlm_eval.distill`` (also under ``accelerate launch -m`` / ``torchrun -m``): one distillation run,
with the options of ``speechlm-eval distill`` that configure training (generated from the same DistillConfig)."""

from __future__ import annotations

from speechlm_eval.cli.distill import train_app


def main() -> None:
    train_app()(prog_name="python -m speechlm_eval.distill")


if __name__ == "__main__":
    main()
