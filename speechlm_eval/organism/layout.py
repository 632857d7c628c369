"""Where an organism build puts its outputs, and whether a directory holds a complete one (torch-free)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from speechlm_eval.data.organism_world import EVAL_SUBSET

ORGANISM_FORMAT = 1  # bump when what a build writes changes
MARKER = "organism.json"


@dataclass(frozen=True)
class OrganismPaths:
    """Where a build put its outputs."""

    root: Path
    text_llm: Path
    speech_llm: Path
    eval_suite: Path
    distill: Path
    summary: Path


def paths_for(out_dir: str | Path) -> OrganismPaths:
    root = Path(out_dir)
    return OrganismPaths(root, root / "text_llm", root / "speech_llm", root / f"{EVAL_SUBSET}.jsonl",
                         root / "distill.jsonl", root / MARKER)


def is_built(out_dir: str | Path) -> bool:
    """True when ``out_dir`` holds a complete build of this format."""
    paths = paths_for(out_dir)
    if not paths.summary.exists():
        return False
    return json.loads(paths.summary.read_text()).get("format") == ORGANISM_FORMAT
