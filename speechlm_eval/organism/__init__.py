"""The model organism: a tiny real-architecture text LLM (Qwen2) and speech LLM (Qwen2-Audio) built offline from a
synthetic world of facts, whose speech stage genuinely causes forgetting (typed accuracy drops after the LM is
unfrozen) and modality inequivalence (spoken accuracy below typed while the audio is heard correctly).

``build(out_dir, seed)`` writes both checkpoints, the evaluation suite and a summary; see ``organism.builder``.
Names are imported lazily so that ``organism.world`` / ``organism.suite`` stay free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OrganismPaths": "builder", "OrganismSpec": "builder", "build": "builder", "is_built": "builder",
    "micro_spec": "builder", "paths_for": "builder", "EVAL_SUBSET": "world", "World": "world", "WorldSpec": "world",
    "check_disjoint": "world", "eval_items": "world", "make_world": "world",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
