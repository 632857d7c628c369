"""Distillation's save and resume paths on a model really sharded by FSDP2 (torch's ``fully_shard``), 2 CPU processes
over gloo: accelerate runs an FSDP config as DDP on CPU, so tests/fixtures/fsdp_worker.py shards the LoRA student
itself and calls the project's functions on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from speechlm_eval.models.base import GenerationConfig, Prompt
from speechlm_eval.models.registry import load_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_a_sharded_student_saves_resumes_and_merges(tiny_pair, tmp_path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    finished = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29547", str(ROOT / "tests" / "fixtures" /
         "fsdp_worker.py"), str(tiny_pair[0]), str(tiny_pair[1]), str(tmp_path)],
        check=False, capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    reports = [json.loads((tmp_path / f"report-rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:  # every weight split in two: each process holds half the rows
        assert report["world"] == 2 and report["sharded_parameters"] > 0
        assert 2 * report["local_rows"] == report["global_rows"]
        assert report["resumed_at"] == [1, 4] and report["lr_after_resume"] == report["lr_before"]
    main = reports[0]  # rank 0 gathers the full state dicts and writes
    assert main["train_state_tensors"] == main["optimizer_states"] == main["gathered_tensors"] > 0
    assert main["same_weights_after_resume"] and main["same_moments_after_resume"]
    assert reports[1]["saved"] is None and main["saved"] == str(tmp_path / "run" / "checkpoint")

    run = tmp_path / "run"
    state = sorted((run / "train_state").glob("step-*"))[-1]
    assert len(load_file(state / "trainable.safetensors")) == main["train_state_tensors"]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert adapter and any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())
    merged = load_file(run / "checkpoint" / "model.safetensors")
    base = load_file(Path(tiny_pair[0]) / "model.safetensors")
    assert any(k in base and not torch.equal(merged[k], base[k]) for k in merged)
    prompt, config = [Prompt(text="What is the capital of France?")], GenerationConfig(max_new_tokens=6)
    assert load_model(str(run / "checkpoint")).generate(prompt, config) == load_model(
        str(run / "adapter")).generate(prompt, config)
