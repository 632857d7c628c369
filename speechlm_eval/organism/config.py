"""The options of ``speechlm-eval organism build`` (torch-free, so the command line starts fast)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class BuildConfig:
    """Where to build the organism, from which seed, and how big."""

    out: Path = field(metadata={"help": "Output directory (text_llm/, speech_llm/, suite, distill data, "
                                        "organism.json)."})
    seed: int = field(default=0, metadata={"help": "World, initialisation and data-order seed; the shipped default "
                                                   "is seed 0."})
    micro: bool = field(default=False, metadata={"help": "A seconds-long smoke build with meaningless weights "
                                                         "(for tests)."})
    quiet: bool = field(default=False, metadata={"help": "No progress bars."})
