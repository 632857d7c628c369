"""The organism's evaluation suite as a benchmark: ``organism:organism_mcq`` (``@seedN`` picks the world's seed), and
its tuning suite ``organism:organism_dev`` (a third of the distillation-only facts; see
:func:`~speechlm_eval.data.organism_world.dev_facts`). The bare name ``organism`` means the evaluation suite.

The suite is regenerated from the seed (the world is deterministic), so nothing needs to be downloaded or bundled;
``LoadOptions.data_dir`` may instead point at a build directory, whose ``organism_mcq.jsonl`` is then read (and must
agree with the regenerated suite). Importing this module registers the benchmark; it imports no torch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import Benchmark, DataError, LoadOptions, SubsetRequest
from speechlm_eval.data.organism_world import DEV_SUBSET, EVAL_SCORER, EVAL_SUBSET, dev_items, eval_items, make_world

NAME = "organism"
DEFAULT_SEED = 0
SEED_SPLITS: tuple[str, ...] = tuple(f"seed{i}" for i in range(10))


def seed_of(request: SubsetRequest) -> int:
    split = request.split or f"seed{DEFAULT_SEED}"
    if split not in SEED_SPLITS:
        raise DataError(f"organism splits are {', '.join(SEED_SPLITS)}; got {split!r}")
    return int(split.removeprefix("seed"))


def load_organism(request: SubsetRequest, options: LoadOptions) -> list[Item]:
    """The evaluation (or tuning) items of the world of the requested seed (text only: the speech arm speaks them)."""
    if request.subset not in (EVAL_SUBSET, DEV_SUBSET):
        raise DataError(f"the organism benchmark's subsets are {EVAL_SUBSET!r} and {DEV_SUBSET!r}")
    seed = seed_of(request)
    if request.subset == DEV_SUBSET:
        items = dev_items(make_world(seed))
        return items if options.limit is None else items[: options.limit]
    items = eval_items(make_world(seed))
    if options.data_dir is not None:
        path = Path(options.data_dir) / f"{EVAL_SUBSET}.jsonl"
        if not path.exists():
            raise DataError(f"no {path.name} in {options.data_dir} (an organism build directory is expected)")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if [(r["prompt"], r["reference"]) for r in rows] != [(i.text, i.reference) for i in items]:
            raise DataError(f"{path} is not the seed-{seed} suite; pass @seedN matching the build")
    return items if options.limit is None else items[: options.limit]


def describe_organism(request: SubsetRequest, options: LoadOptions) -> dict[str, Any]:
    return {"seed": seed_of(request), "generator": "speechlm_eval.data.organism_world.make_world", "scorer": EVAL_SCORER}


BENCHMARK = Benchmark(
    name=NAME,
    load=load_organism,
    scorer={EVAL_SUBSET: EVAL_SCORER, DEV_SUBSET: EVAL_SCORER},
    default_subsets=(EVAL_SUBSET,),
    splits={EVAL_SUBSET: SEED_SPLITS, DEV_SUBSET: SEED_SPLITS},
    describe=describe_organism,
)
