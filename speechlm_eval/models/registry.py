"""Model families by name, in one lazy table: a family is one file defining ``FAMILY`` plus one row here, and
``load_model`` picks the family from the checkpoint's config."""

from __future__ import annotations

import json
from pathlib import Path

from speechlm_eval.models.base import Family, LoadOptions, ModelLoadError, SpeechLM
from speechlm_eval.registry import Registry

__all__ = ["FAMILIES", "Family", "LoadOptions", "ModelLoadError", "detect_family", "get_family", "load_model",
           "register_family"]

FAMILIES: Registry[Family] = Registry(
    "model family",
    {
        "hf-causal": "speechlm_eval.models.hf_causal:FAMILY",
        "qwen2-audio": "speechlm_eval.models.qwen2_audio:FAMILY",
        "qwen2.5-omni": "speechlm_eval.models.qwen2_5_omni:FAMILY",
        "audioflamingo3": "speechlm_eval.models.audioflamingo3:FAMILY",
        "qwen3-omni": "speechlm_eval.models.qwen3_omni:FAMILY",
        "granite-speech": "speechlm_eval.models.granite_speech:FAMILY",
        "gemma3n": "speechlm_eval.models.gemma3n:FAMILY",
        "phi4-multimodal": "speechlm_eval.models.phi4_multimodal:FAMILY",
        "voxtral": "speechlm_eval.models.voxtral:FAMILY",
    },
    unknown=lambda name, known: ModelLoadError(f"unknown model family {name!r}; registered: {known}"),
)
FALLBACK_FAMILY = "hf-causal"  # a checkpoint no family claims is loaded as a plain causal LM


def register_family(family: Family) -> Family:
    """Add (or replace) a family object at run time (a plug-in may instead add a ``"module:FAMILY"`` row)."""
    FAMILIES.register(family.name, family, replace=True)
    return family


def get_family(name: str) -> Family:
    return FAMILIES.get(name)


def detect_family(name_or_path: str, options: LoadOptions) -> Family:
    """The family whose ``model_types`` contains the checkpoint's ``model_type``; else the plain causal-LM family."""
    model_type = read_model_type(name_or_path, options)
    for _, family in FAMILIES.items():
        if model_type in family.model_types:
            return family
    return FAMILIES.get(FALLBACK_FAMILY)


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
    """Load a checkpoint through its family's loader (``family`` forces one).

    A PEFT adapter folder (``adapter_config.json``, as ``distill`` writes to ``OUT/adapter``) loads its base model
    (``base_model_name_or_path``) through the base's family, applies the adapter and merges it for evaluation. A
    folder that also holds a ``config.json`` is a whole checkpoint that ships an adapter of its own (Granite Speech's
    audio-only LoRA sits beside its weights): its family loads it (transformers draws the same line).
    """
    folder = Path(name_or_path).expanduser()
    adapter_config = folder / "adapter_config.json"
    if adapter_config.is_file() and not (folder / "config.json").is_file():
        return load_adapter(name_or_path, json.loads(adapter_config.read_text()), options, family)
    chosen = get_family(family) if family else detect_family(name_or_path, options)
    return chosen.load(name_or_path, options)


def load_adapter(path: str, adapter_config: dict, options: LoadOptions, family: str | None) -> SpeechLM:
    """The base model with the LoRA adapter at ``path`` merged in; its manifest identity names both."""
    from peft import PeftModel

    from speechlm_eval.models.speech_adapter import beside_speech_adapter, merge_lora

    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise ModelLoadError(f"{path}: adapter_config.json names no base model (base_model_name_or_path)")
    model = load_model(base, options, family)
    with beside_speech_adapter():  # a base may hold its own audio-only adapter
        adapted = PeftModel.from_pretrained(model.model, path)  # type: ignore[attr-defined]
    model.model = merge_lora(adapted).eval()  # type: ignore[attr-defined]
    describe = model.describe

    def describe_adapter() -> dict:
        return {**describe(), "id": path, "adapter_of": base}

    model.name = path  # type: ignore[misc]
    model.describe = describe_adapter  # type: ignore[method-assign]
    return model
