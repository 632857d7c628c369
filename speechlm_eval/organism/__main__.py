"""``python -m speechlm_eval.organism build --out DIR [--seed N] [--micro]``: build the model organism."""

from __future__ import annotations

import argparse
import json
import sys

from speechlm_eval.organism.build import OrganismSpec, build, micro_spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m speechlm_eval.organism")
    commands = parser.add_subparsers(dest="command", required=True)
    build_cmd = commands.add_parser("build", help="build the text LLM, the speech LLM and the evaluation suite")
    build_cmd.add_argument("--out", required=True, help="output directory")
    build_cmd.add_argument("--seed", type=int, default=0)
    build_cmd.add_argument("--micro", action="store_true", help="a seconds-long smoke build (meaningless weights)")
    build_cmd.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    spec = micro_spec() if args.micro else OrganismSpec()
    paths = build(args.out, seed=args.seed, spec=spec, progress=not args.quiet)
    summary = json.loads(paths.summary.read_text())
    print(json.dumps({k: summary.get(k) for k in ("timings_s", "sizes", "measurements")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
