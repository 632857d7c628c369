"""The model organism: a tiny real-architecture text LLM (Qwen2) and speech LLM (Qwen2-Audio) built offline from a
synthetic world of facts (:mod:`speechlm_eval.data.organism_world`), whose speech stage genuinely causes forgetting
(typed accuracy drops after the LM is unfrozen) and modality inequivalence (spoken accuracy below typed while the
audio is heard correctly).

``build(out_dir, seed)`` writes both checkpoints, the evaluation suite and a summary (``organism.builder``); where
they go is ``organism.layout`` (torch-free). Names are imported lazily so that importing the package stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OrganismSpec": "builder", "build": "builder", "micro_spec": "builder", "build_organism": "builder",
    "OrganismPaths": "layout", "is_built": "layout", "paths_for": "layout", "BuildConfig": "config",
}  # fmt: skip
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
