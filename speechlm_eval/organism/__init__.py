"""The model organism: a tiny real-architecture text LLM (Qwen2) and speech LLM (Qwen2-Audio) built offline from a
synthetic world of facts, whose speech stage genuinely causes forgetting (typed accuracy drops after the LM is
unfrozen) and modality inequivalence (spoken accuracy below typed while the audio is heard correctly).

``build(out_dir, seed)`` writes both checkpoints, the evaluation suite and a summary; see ``organism.build``.
"""

from speechlm_eval.organism.build import OrganismPaths, OrganismSpec, build, is_built, micro_spec, paths_for
from speechlm_eval.organism.world import EVAL_SUBSET, World, WorldSpec, check_disjoint, eval_items, make_world

__all__ = [
    "EVAL_SUBSET",
    "OrganismPaths",
    "OrganismSpec",
    "World",
    "WorldSpec",
    "build",
    "check_disjoint",
    "eval_items",
    "is_built",
    "make_world",
    "micro_spec",
    "paths_for",
]
