"""Model families by name: a family is one file that registers a loader; ``load_model`` picks one from the config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from speechlm_eval.models.base import SpeechLM


@dataclass(frozen=True)
class LoadOptions:
    """How to load a checkpoint. ``device``/``dtype`` accept "auto"."""

    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class Family:
    """A model family: ``model_types`` are the ``config.json`` ``model_type`` values it claims."""

    name: str
    load: Callable[[str, LoadOptions], SpeechLM]
    model_types: tuple[str, ...] = ()
    accepts_audio: bool = True


_FAMILIES: dict[str, Family] = {}


class ModelLoadError(ValueError):
    """A model that cannot be loaded: unknown path/id, unknown family, missing files."""


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def family_names() -> list[str]:
    _load_builtin_families()
    return sorted(_FAMILIES)


def get_family(name: str) -> Family:
    _load_builtin_families()
    if name not in _FAMILIES:
        raise ModelLoadError(f"unknown model family {name!r}; registered: {sorted(_FAMILIES)}")
    return _FAMILIES[name]


def detect_family(name_or_path: str, options: LoadOptions) -> Family:
    """The family whose ``model_types`` contains the checkpoint's ``model_type``; plain causal LMs fall back to hf-causal."""
    _load_builtin_families()
    model_type = read_model_type(name_or_path, options)
    for family in _FAMILIES.values():
        if model_type in family.model_types:
            return family
    return _FAMILIES["hf-causal"]


def read_model_type(name_or_path: str, options: LoadOptions) -> str:
    """``model_type`` from the checkpoint's config, with a clear error for a path or id that does not resolve."""
    from transformers import AutoConfig

    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ModelLoadError(f"model path {name_or_path!r} does not exist or is not a directory")
    try:
        config = AutoConfig.from_pretrained(
            name_or_path, revision=options.revision, trust_remote_code=options.trust_remote_code
        )
    except Exception as error:  # noqa: BLE001 - transformers raises many types; we re-raise with the model named
        raise ModelLoadError(f"cannot read the config of model {name_or_path!r}: {error}") from error
    return str(config.model_type)


def load_model(name_or_path: str, options: LoadOptions = LoadOptions(), family: str | None = None) -> SpeechLM:
    """Load a checkpoint through its family's loader (``family`` forces one)."""
    chosen = get_family(family) if family else detect_family(name_or_path, options)
    return chosen.load(name_or_path, options)


def _load_builtin_families() -> None:
    # Importing the modules registers them; done lazily so `import speechlm_eval.models` stays light.
    from speechlm_eval.models import hf_causal, qwen2_5_omni, qwen2_audio  # noqa: F401
