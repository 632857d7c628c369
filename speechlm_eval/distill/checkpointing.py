"""Train states and the saved student of a distillation run: what ``--resume`` reads and what a user keeps.

``OUT/train_state/step-NNNNNNNN/`` holds the trainable tensors (safetensors), the optimizer and scheduler states
(``torch.save``, read back with ``weights_only=True``), each process's RNG states (JSON + safetensors) and
``state.json``: nothing in it unpickles code. Every folder is written beside its final name and renamed into place,
and :func:`remove_interrupted_writes` clears what a kill between the two leaves.

The trainable tensors and optimizer state are full, unsharded state dicts keyed by parameter name
(``torch.distributed.checkpoint.state_dict``), so one layout serves one process, DDP and FSDP (where every process
takes part in the gather and rank 0 writes). Why not accelerate's ``save_state``/``load_state`` (accelerate 1.15): its
RNG states are a pickle (``random_states_N.pkl``), read under ``weights_only=True`` with NumPy globals allowlisted,
and a failure to restore them is only logged ("Could not load random states"), so a resume can silently diverge; our
hand-stepped scheduler and counters would be ``register_for_checkpointing`` objects, which ``load_state`` reads with
``weights_only=False`` (arbitrary code); and it checks neither the process count nor the data order (docs/distill.md).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from speechlm_eval.distill.config import ConfigError, DistillConfig, our_reading_for


# 2: trainable tensors and optimizer state as full (unsharded) state dicts keyed by parameter name (1: the optimizer's
# own index-keyed state, from this process only).
TRAIN_STATE_LAYOUT = 2


def _full(**options: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **options)


def full_train_state(model: torch.nn.Module, optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trainable tensors and the optimizer state as full, unsharded state dicts on CPU, keyed by parameter name
    (``torch.distributed.checkpoint.state_dict``: the same layout from one process, DDP or FSDP, which gathers the
    shards here, so every process must call it). Frozen weights are left out; other ranks than 0 may get empty dicts
    under FSDP (rank 0 writes)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _full(cpu_offload=True, ignore_frozen_params=True)
    weights = {n: t.contiguous() for n, t in get_model_state_dict(model, options=options).items()}
    return weights, get_optimizer_state_dict(model, _inner(optimizer), options=options)


def load_full_train_state(model: torch.nn.Module, optimizer: Any, weights: dict[str, torch.Tensor],
                          optimizer_state: dict[str, Any]) -> None:
    """Load what :func:`full_train_state` saved (every process passes the full dicts; FSDP re-shards them)."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, weights, options=_full(strict=False))
    set_optimizer_state_dict(model, _inner(optimizer), optimizer_state, options=_full())


def _inner(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


def save_rng_state(directory: Path, rank: int) -> None:
    """This process's RNG states, as JSON (Python's, NumPy's) and safetensors (torch's): nothing that unpickles."""
    from safetensors.torch import save_file

    version, internal, gauss = random.getstate()
    kind, key, pos, has_gauss, cached = np.random.get_state()
    write_json(directory / f"rng-rank{rank}.json", {
        "python": [version, list(internal), gauss],
        "numpy": {"kind": kind, "key": key.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
    })
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    save_file(tensors, directory / f"rng-rank{rank}.safetensors")


def load_rng_state(directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    state = json.loads((directory / f"rng-rank{rank}.json").read_text())
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    tensors = load_file(directory / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda{i}"] for i in range(len(tensors) - 1) if f"cuda{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def load_tensors_only(path: Path) -> Any:
    """An optimizer or scheduler state saved with ``torch.save``, read with ``weights_only=True`` (tensors and plain
    Python values only: a crafted file in an output folder cannot run code)."""
    import pickle

    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(f"{path} holds more than tensors and plain values; refusing to load it ({error})") from None


def save_train_state(out: Path, step: int, epoch: int, examples_seen: int, plan: list, accelerator: Any,
                     model: torch.nn.Module, optimizer: Any, scheduler: Any, config: DistillConfig) -> Path:
    """Write ``OUT/train_state/step-NNNNNNNN/`` atomically (a temp dir renamed into place) and prune old ones.

    Holds: the trainable weights, optimizer and scheduler states, each process's RNG states, and ``state.json``
    (step, epoch, examples seen, process count, this epoch's data order).
    """
    from safetensors.torch import save_file

    root = out / "train_state"
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_rng_state(tmp, accelerator.process_index)
    weights, optimizer_state = full_train_state(model, optimizer)  # every process: collectives under FSDP
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_file(weights, tmp / "trainable.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_json(tmp / "state.json", {
            "step": step, "epoch": epoch, "examples_seen": examples_seen, "processes": accelerator.num_processes,
            "data_order": [i for s in plan[epoch] for mb in s for i in mb], "layout": TRAIN_STATE_LAYOUT,
        })
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[: -max(1, config.keep_states)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_is_due(last_save: float, minutes: float, accelerator: Any) -> bool:
    """True when ``minutes`` have passed since the last train state on the main process (every process agrees: the
    main process's clock decides, broadcast to the others)."""
    if not minutes:
        return False
    due = torch.tensor([1 if time.time() - last_save >= 60 * minutes else 0], device=accelerator.device)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        due = broadcast(due, from_process=0)
    return bool(due.item())


def remove_interrupted_writes(out: Path) -> None:
    """What a kill between a temp write and its rename leaves: ``.tmp-step-*`` train states, a ``.checkpoint.tmp``
    folder, ``.*.tmp`` files (resume never reads them; left alone they pile up)."""
    from speechlm_eval.records import remove_stale_temps

    for leftover in [*(out / "train_state").glob(".tmp-step-*"), *out.glob(".*.tmp")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    for folder in (out, out / "data", out / "teacher_cache"):
        if folder.is_dir():
            remove_stale_temps(folder)


def latest_train_state(out: Path) -> Path | None:
    """The newest complete train state (temp dirs of an interrupted save are ignored)."""
    states = sorted((out / "train_state").glob("step-*"))
    return states[-1] if states else None


def load_train_state(state_dir: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any,
                     plan: list) -> tuple[int, int]:
    """Restore a train state; returns ``(step, examples_seen)``. Refuses a different process count or data order."""
    from safetensors.torch import load_file

    state = json.loads((state_dir / "state.json").read_text())
    if state["processes"] != accelerator.num_processes:
        raise ConfigError(f"{state_dir} was written by {state['processes']} processes; resume with the same number "
                          f"(now {accelerator.num_processes})")
    if state["data_order"] != [i for s in plan[state["epoch"]] for mb in s for i in mb]:
        raise ConfigError(f"{state_dir}: the data order differs from the saved one (did the data change?)")
    if state.get("layout") != TRAIN_STATE_LAYOUT:
        raise ConfigError(f"{state_dir} was written by an older speechlm-eval (train state layout "
                          f"{state.get('layout', 1)}, now {TRAIN_STATE_LAYOUT}); start over with --overwrite")
    weights = load_file(state_dir / "trainable.safetensors")
    unwrapped = accelerator.unwrap_model(model)
    missing = {n for n, p in unwrapped.named_parameters() if p.requires_grad} - set(weights)
    if missing:
        raise ConfigError(f"{state_dir} lacks trained tensors such as {sorted(missing)[:3]}")
    load_full_train_state(model, optimizer, weights, load_tensors_only(state_dir / "optimizer.pt"))
    scheduler.load_state_dict(load_tensors_only(state_dir / "scheduler.pt"))
    load_rng_state(state_dir, accelerator.process_index)
    return int(state["step"]), int(state["examples_seen"])


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the last train state, before a kill): a resume redoes them."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):
            continue  # a line torn by the kill
    from speechlm_eval.records import write_text_atomic

    write_text_atomic(path, "".join(kept))


def save_student(model: torch.nn.Module, processor: Any, out: Path, config: DistillConfig,
                 state_dict: dict[str, torch.Tensor] | None = None, speech_adapter_folder: str | None = None) -> Path:
    """Write what a user keeps, each folder replaced atomically, and return the one ``gap`` should score:

    - with LoRA, ``OUT/adapter`` (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with peft onto the
      original student, and by ``load_model``), then, unless ``--no-merge``, ``OUT/checkpoint``: the merged student;
    - with a full fine-tune, ``OUT/checkpoint``. Both carry the processor and the distillation config.

    ``state_dict``: the gathered full state dict (:func:`gathered_student_state`) under FSDP, whose sharded
    parameters rank 0 cannot save alone. The merge needs unsharded LoRA layers, so there the merged student is built
    from what was just saved: the adapter folder loaded onto a fresh copy of the original student on this process's
    CPU (:func:`merged_from_adapter`; memory: one unsharded student, as a merge on one GPU would need).

    A student that holds its checkpoint's own audio-only adapter (Granite Speech, Phi-4-multimodal): ``OUT/adapter``
    holds distillation's LoRA only; ``OUT/checkpoint`` has it merged into the base weights and the audio-only adapter
    written apart again, unchanged, in ``speech_adapter_folder`` (the family's place for it), so that it stays off
    on text.
    """
    from speechlm_eval.models.speech_adapter import merge_lora, save_with_speech_adapter, speech_adapter_loaded

    record = {"config": config.to_dict(), "our_reading": our_reading_for(config)}

    def write(target: torch.nn.Module, weights: dict[str, Any], adapter_only: bool = False) -> Callable[[Path], Any]:
        def into(tmp: Path) -> None:
            if adapter_only:  # distillation's LoRA alone
                target.save_pretrained(tmp, selected_adapters=["default"], **weights)
            elif speech_adapter_loaded(target):
                if speech_adapter_folder is None:
                    raise ValueError("a student with an audio-only adapter needs its family's speech_adapter_folder")
                save_with_speech_adapter(target, tmp, speech_adapter_folder, weights.get("state_dict"))
            else:
                target.save_pretrained(tmp, **weights)
            processor.save_pretrained(tmp)
            write_json(tmp / "speechlm_eval_distill.json", record)
        return into

    gathered = {} if state_dict is None else {"state_dict": state_dict}
    if config.lora:
        adapter = out / "adapter"
        _replace_folder(adapter, write(model, gathered, adapter_only=True))
        if not config.merge:
            return adapter
        if state_dict is not None:
            frozen = next((p for p in model.parameters() if not p.requires_grad), None)
            model = merged_from_adapter(adapter, frozen.dtype if frozen is not None else None)
        else:
            model = merge_lora(model)
        gathered = {}
    model.eval()
    checkpoint = out / "checkpoint"
    _replace_folder(checkpoint, write(model, gathered))
    return checkpoint


def merged_from_adapter(adapter: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The student with the LoRA adapter saved at ``adapter`` merged in, loaded on the CPU in ``dtype`` (the trained
    student's; default: float32) through the family loader, as ``gap`` loads an adapter folder (the base model from
    ``base_model_name_or_path``)."""
    from speechlm_eval.models.base import LoadOptions
    from speechlm_eval.models.registry import load_model

    options = LoadOptions(device="cpu", dtype=str(dtype).removeprefix("torch.") if dtype is not None else "auto")
    return load_model(str(adapter), options).model  # type: ignore[attr-defined]


def gathered_student_state(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The student's full state dict on CPU, gathered from its shards (every process must call it; rank 0 gets the
    tensors): only the trained tensors (the adapter) with LoRA, else every tensor."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full(cpu_offload=True, ignore_frozen_params=lora))


def _replace_folder(final: Path, write: Callable[[Path], Any]) -> None:
    """``write(tmp)`` into a temp folder beside ``final``, then swap it in (a kill leaves the old folder or a temp)."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as JSON at ``path``, atomically (a temp file renamed into place)."""
    from speechlm_eval.records import write_json_atomic

    write_json_atomic(path, obj)
