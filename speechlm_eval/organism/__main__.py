"""``python -m speechlm_eval.organism build --out DIR [--seed N] [--micro]``: build the model organism;
``python -m speechlm_eval.organism experiments --build DIR [--build DIR2] --out OUT``: the distillation experiment."""

from __future__ import annotations

import argparse
import json
import sys

from speechlm_eval.organism.builder import OrganismSpec, build, micro_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speechlm_eval.organism")
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the text LLM, the speech LLM and the evaluation suite")
    build_cmd.add_argument("--out", required=True, help="output directory")
    build_cmd.add_argument("--seed", type=int, default=0)
    build_cmd.add_argument("--micro", action="store_true", help="a seconds-long smoke build (meaningless weights)")
    build_cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    experiments_cmd = commands.add_parser(
        "experiments", help="KD, its channel ablations and two controls on one or more builds (one per seed)")
    experiments_cmd.add_argument("--build", action="append", default=[], help="an organism build directory")
    experiments_cmd.add_argument("--combine", action="append", default=[],
                                 help="instead of running: merge the experiments.json of earlier --out directories")
    experiments_cmd.add_argument("--out", required=True, help="output directory (runs, experiments.{json,md})")
    experiments_cmd.add_argument("--arm", action="append", default=None, help="only these arms (default: all)")
    args = parser.parse_args(argv)
    if args.command == "experiments":
        from pathlib import Path

        from speechlm_eval.organism.experiments import ARMS, combine, run_experiments

        if args.combine:
            combine([Path(c) for c in args.combine], Path(args.out))
        else:
            run_experiments([Path(b) for b in args.build], Path(args.out), args.arm or tuple(ARMS))
        print(Path(args.out) / "experiments.md")
        return 0
    spec = micro_spec() if args.micro else OrganismSpec()
    paths = build(args.out, seed=args.seed, spec=spec, progress=not args.quiet)
    summary = json.loads(paths.summary.read_text())
    print(json.dumps({k: summary.get(k) for k in ("timings_s", "sizes", "measurements")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
