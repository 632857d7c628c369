"""``python -m speechlm_eval.cli`` (and ``torchrun -m speechlm_eval.cli`` / ``accelerate launch -m``): the command line."""

from speechlm_eval.cli import main

main()
