"""The audio-only LoRA adapter some checkpoints ship (Granite Speech, Phi-4-multimodal): loaded with peft, switched
on for audio prompts only, and kept apart from any other adapter when a checkpoint is trained, merged and saved.

Their reference code applies that adapter only when the input holds audio; on text the language model runs without
it. A second LoRA (distillation's, named ``default`` by peft) can sit on the same layers: it is on for every prompt,
and merging it into the base weights must leave the speech adapter where it was, as a separate adapter that is still
off on text (peft's ``merge_and_unload`` would bake every active adapter into the weights and drop the rest).
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from speechlm_eval.models.base import LoadOptions

SPEECH_ADAPTER = "speech"  # the adapter name a checkpoint's own audio-only LoRA is loaded under


def load_speech_adapter(model: torch.nn.Module, name_or_path: str, options: LoadOptions, *, subfolder: str = "",
                        adapter: str = SPEECH_ADAPTER) -> bool:
    """Load the LoRA adapter a checkpoint ships for audio prompts (``adapter_config.json`` +
    ``adapter_model.safetensors`` in ``subfolder``) into ``model`` with peft, switched off; False when there is none.

    Loaded with peft itself rather than transformers' adapter integration, which needs peft >= 0.22 in transformers
    5.x (and is what Granite Speech's ``from_pretrained`` would call on its own; see :data:`NO_AUTOMATIC_ADAPTER`).
    The adapter weights are frozen; :func:`set_speech_adapter` turns it on for audio batches only.
    """
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers.utils import cached_file

    from speechlm_eval.models.base import ModelLoadError

    where = dict(subfolder=subfolder, revision=options.revision, _raise_exceptions_for_missing_entries=False,
                 _raise_exceptions_for_connection_errors=False)
    config_file = cached_file(name_or_path, "adapter_config.json", **where)
    if config_file is None:
        return False
    weights_file = cached_file(name_or_path, "adapter_model.safetensors", **where)
    if weights_file is None:
        raise ModelLoadError(f"{name_or_path!r}: {subfolder or '.'}/adapter_config.json without adapter_model.safetensors")
    with open(config_file, encoding="utf-8") as handle:
        raw = json.load(handle)
    known = set(LoraConfig.__dataclass_fields__)
    lora = LoraConfig(**{k: v for k, v in raw.items() if k in known and k not in ("peft_type", "auto_mapping")})
    lora.inference_mode = True
    state = {k.removeprefix("base_model.model."): v for k, v in load_file(weights_file).items()}
    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    inject_adapter_in_model(lora, model, adapter_name=adapter)  # peft freezes every other parameter here...
    result = set_peft_model_state_dict(model, state, adapter_name=adapter)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if unexpected:
        raise ModelLoadError(f"{name_or_path!r}: adapter weights match no module ({unexpected[:3]} ...)")
    for name, param in model.named_parameters():  # ...which is undone: only the adapter's own weights are frozen
        param.requires_grad_(False if f".{adapter}." in name else trainable.get(name.replace(".base_layer", ""), True))
    set_speech_adapter(model, False, adapter)
    return True


# ``from_pretrained(..., adapter_kwargs=NO_AUTOMATIC_ADAPTER)``: transformers looks for an adapter_config.json in this
# (absent) subfolder, finds none and loads the base weights only; :func:`load_speech_adapter` then loads the adapter.
NO_AUTOMATIC_ADAPTER = {"subfolder": "speechlm-eval-loads-the-adapter-itself"}


def lora_layers_with(model: torch.nn.Module, adapter: str) -> list[Any]:
    """The peft LoRA layers of ``model`` that hold ``adapter``."""
    return [m for m in model.modules() if isinstance(getattr(m, "lora_A", None), torch.nn.ModuleDict)
            and adapter in m.lora_A]


@contextlib.contextmanager
def beside_speech_adapter() -> Iterator[None]:
    """Silence peft's warnings that a second adapter joins a model that already holds one (the checkpoint's speech
    adapter): intended wherever distillation's LoRA is added beside it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(for a second time|multiple adapters).*")
        yield


def set_speech_adapter(model: torch.nn.Module, active: bool, adapter: str = SPEECH_ADAPTER) -> None:
    """Turn a checkpoint's own audio-only LoRA adapter on (audio prompts) or off (text prompts).

    Granite Speech and Phi-4-multimodal ship a LoRA adapter that their reference code applies only when the input
    holds audio; on text the language model runs without it. transformers switches it inside
    ``GraniteSpeechForConditionalGeneration.generate`` only, not in ``forward`` (log-probs, teacher-forced logits).
    Only this adapter is added to or removed from each layer's active adapters (another one, e.g. distillation's
    LoRA, stays as it is), and no ``requires_grad`` flag changes. No-op on layers without it.
    """
    for module in lora_layers_with(model, adapter):
        names = [n for n in module.active_adapters if n != adapter]
        wanted = names + [adapter] if active else names
        if list(module.active_adapters) != wanted:
            module._active_adapter = wanted


def speech_adapter_loaded(model: torch.nn.Module, adapter: str = SPEECH_ADAPTER) -> bool:
    """Whether ``model`` holds the checkpoint's own audio-only adapter."""
    return bool(lora_layers_with(model, adapter))


def freeze_speech_adapter(model: torch.nn.Module, adapter: str = SPEECH_ADAPTER) -> None:
    """``requires_grad=False`` on the speech adapter's weights (peft re-enables an adapter's gradients whenever it
    makes it active, e.g. while adding or deleting another adapter)."""
    for layer in lora_layers_with(model, adapter):
        for name in layer.adapter_layer_names:
            part = getattr(layer, name)
            if adapter in part:  # lora_A and lora_B; the embedding dicts are empty on a linear layer
                part[adapter].requires_grad_(False)


@torch.no_grad()
def merge_keeping_speech_adapter(peft_model: Any, adapter: str = "default",
                                 speech_adapter: str = SPEECH_ADAPTER) -> torch.nn.Module:
    """The model under ``peft_model`` with the LoRA ``adapter`` added into its base weights and removed, and the
    checkpoint's own ``speech_adapter`` kept as a separate, frozen adapter, off until an audio batch turns it on.

    Exact: LoRA deltas add, so ``W + ΔW_adapter`` with the speech adapter on top computes what training computed.
    Every layer is a peft LoRA layer whose base layer has a ``weight`` (``torch.nn.Linear`` here).
    """
    tuner = peft_model.base_model
    for layer in lora_layers_with(tuner.model, adapter):
        base = layer.get_base_layer()
        base.weight.add_(layer.get_delta_weight(adapter).to(base.weight.dtype))
    with warnings.catch_warnings():  # "Setting active adapter to speech": peft's choice, undone below
        warnings.filterwarnings("ignore", message=".*which is now deleted.*")
        tuner.delete_adapter(adapter)  # peft makes the speech adapter active here (the only one left)...
    model = tuner.model
    set_speech_adapter(model, False, speech_adapter)  # ...which is undone
    freeze_speech_adapter(model, speech_adapter)
    return model


def base_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as the checkpoint lays it out before any adapter was injected: every peft layer's base weights
    under their own names (``....q_proj.weight``, not ``....q_proj.base_layer.weight``), no adapter weights."""
    return {name.replace(".base_layer.", "."): tensor for name, tensor in state_dict.items() if ".lora_" not in name}


def merge_lora(peft_model: Any, adapter: str = "default") -> torch.nn.Module:
    """The model under ``peft_model`` with its LoRA ``adapter`` merged into the weights: peft's ``merge_and_unload``,
    or :func:`merge_keeping_speech_adapter` when the model holds a checkpoint's own audio-only adapter."""
    if speech_adapter_loaded(peft_model):
        return merge_keeping_speech_adapter(peft_model, adapter)
    return peft_model.merge_and_unload()


def save_speech_adapter(state_dict: dict[str, torch.Tensor], config: Any, directory: Path,
                        adapter: str = SPEECH_ADAPTER) -> None:
    """Write the speech adapter's tensors from ``state_dict`` (a model's, or one gathered from FSDP shards) and its
    peft ``config`` in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with
    ``base_model.model.`` keys and no adapter name in them, as :func:`load_speech_adapter` reads it back."""
    from safetensors.torch import save_file

    own = re.compile(rf"\.{re.escape(adapter)}(?=\.|$)")
    tensors = {"base_model.model." + own.sub("", name): tensor.detach().cpu().contiguous()
               for name, tensor in state_dict.items() if ".lora_" in name and own.search(name)}
    if not tensors:
        raise ValueError(f"the state dict holds no weights of the {adapter!r} adapter")
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    # peft's own ``LoraConfig.save_pretrained`` lists a set in hash order; sorted here, so a save is byte-stable.
    raw = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    (directory / "adapter_config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_with_speech_adapter(model: torch.nn.Module, directory: Path, folder: str,
                             state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Save a whole checkpoint of ``model`` that holds its own speech adapter, as the original is laid out: the base
    weights under their own names (``save_pretrained``), and the adapter in ``directory/folder``.

    ``state_dict``: the model's full state dict when the model itself cannot give it (FSDP shards gathered on rank 0).
    """
    state = model.state_dict() if state_dict is None else state_dict
    model.save_pretrained(directory, state_dict=base_state_dict(state))
    save_speech_adapter(state, model.peft_config[SPEECH_ADAPTER], directory / folder if folder else directory)
