"""The local-model judge backend (``--judge hf:PATH``): samples ``n`` answers per prompt from a checkpoint loaded
through our model families, seeded from the prompt so outputs do not depend on order or batching."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

from speechlm_eval.judge.base import Judge, JudgeError, JudgeSettings


def hf_judge(spec: str, path: str, settings: JudgeSettings, seed: int, device: str, dtype: str) -> Judge:
    if settings.frequency_penalty or settings.presence_penalty:
        raise JudgeError("the hf judge samples with temperature/top_p only; frequency/presence penalties must be 0")
    identity = {"backend": "hf", "model": _checkpoint_identity(path), "seed": seed, "dtype": dtype,
                **settings.to_dict()}

    @functools.cache
    def model() -> Any:
        # Imported here: scoring must stay importable without torch/transformers (a report needs no model).
        from speechlm_eval.models.registry import LoadOptions, load_model

        return load_model(path, LoadOptions(device=device, dtype=dtype))

    def complete(prompt: str) -> list[str]:
        from speechlm_eval.models.base import GenerationConfig, Prompt

        # One generate call per prompt, its n samples as n rows, seeded from the prompt itself: the outputs of a
        # prompt do not depend on which other prompts are judged, in what order or batch.
        config = GenerationConfig(max_new_tokens=settings.max_tokens, do_sample=True, temperature=settings.temperature,
                                  top_p=settings.top_p, seed=prompt_seed(seed, prompt))
        generations = model().generate([Prompt(text=prompt, system=settings.system)] * settings.n, config)
        return [g.text.strip() for g in generations]

    return Judge(spec=spec, identity=identity, complete=complete, workers=1, details={"path": path})


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt for the hf judge: a 63-bit number from ``seed`` and the prompt text."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _checkpoint_identity(path: str) -> dict[str, Any]:
    """What identifies a judge checkpoint without loading it: for a local directory, a hash of its config and
    tokenizer files plus each weight file's name, size and first/last MiB (fine-tunes of one architecture differ
    there); for a hub id, the id."""
    directory = Path(path).expanduser()
    if not directory.is_dir():
        return {"id": path}
    digest = hashlib.sha256()
    for file in sorted(directory.iterdir()):
        if file.suffix in {".json", ".jinja", ".txt", ".model"}:  # config, tokenizer, chat template
            digest.update(f"{file.name}\0".encode() + file.read_bytes())
        elif file.suffix in {".safetensors", ".bin", ".pt"}:
            size = file.stat().st_size
            with open(file, "rb") as handle:
                head = handle.read(1 << 20)
                handle.seek(max(0, size - (1 << 20)))
                tail = handle.read()
            digest.update(f"{file.name}\0{size}\0".encode() + head + tail)
    return {"fingerprint": digest.hexdigest()}
