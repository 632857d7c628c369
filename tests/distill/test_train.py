"""The distillation recipe end to end on the tiny offline pair: it lowers the KD loss and the speech/text gap, saves a
checkpoint ``load_model`` reads, resumes to bit-identical weights, runs channel ablations, and runs under 2 processes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from speechlm_eval.data.item import Item
from speechlm_eval.distill.data import LeakageError, attach_audio, speech_prompt, text_prompt
from speechlm_eval.distill.config import ConfigError, DistillConfig, our_reading_for
from speechlm_eval.distill.teacher_cache import TeacherCache
from speechlm_eval.distill.vocab import KDSupport
from speechlm_eval.distill.train import (
    distill,
    distill_losses,
    make_tts,
    read_prepared,
    response_ids,
)
from speechlm_eval.divergence import token_kl
from speechlm_eval.models.registry import load_model

# Small enough for a 2-core CPU: ~11 examples after filtering, 3 steps an epoch, short targets.
SMALL = {"max_examples": 12, "batch_size": 4, "max_response_tokens": 16, "lr": 1e-2, "epochs": 2, "save_every": 2,
         "seed": 0}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_config(tiny_pair, out: Path, **overrides) -> DistillConfig:
    speech, text = tiny_pair
    return DistillConfig(student=str(speech), teacher=str(text), out=out, **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def trained(tiny_pair, tmp_path_factory):
    config = make_config(tiny_pair, tmp_path_factory.mktemp("distill") / "run")
    started = time.time()
    checkpoint = distill(config)
    return config, checkpoint, time.time() - started


def state_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


def fixed_batch(config: DistillConfig, student, n: int = 4):
    examples, _ = read_prepared(config.out)
    batch = attach_audio(examples[:n], make_tts(config))
    return batch, [response_ids(student.tokenizer, e.response, config.max_response_tokens) for e in batch]


def log_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


# -- what distillation does -------------------------------------------------------------------------------------------


def test_distillation_lowers_the_kd_loss_on_a_fixed_batch(trained, tiny_pair):
    config, checkpoint, _ = trained
    before, after = load_model(str(tiny_pair[0])), load_model(str(checkpoint))
    cache = TeacherCache.open(config.out / "teacher_cache")
    batch, targets = fixed_batch(config, before)
    with torch.no_grad():
        support = KDSupport(size=len(before.tokenizer))  # one tokenizer: the whole vocabulary, id for id
        loss_before = distill_losses(before, None, cache, batch, targets, config, ("tt", "st"), support)
        loss_after = distill_losses(after, None, cache, batch, targets, config, ("tt", "st"), support)
    for channel in ("loss_tt", "loss_st"):
        print(channel, float(loss_before[channel]), float(loss_after[channel]))
        assert loss_after[channel] < 0.9 * loss_before[channel], (channel, loss_before, loss_after)


def test_distillation_lowers_the_kl_between_speech_in_and_text_in(trained, tiny_pair):
    config, checkpoint, _ = trained

    def speech_text_kl(model) -> float:
        batch, targets = fixed_batch(config, model)
        with torch.no_grad():
            text_logits, _, mask = model.continuation_logits([text_prompt(e) for e in batch], targets)
            speech_logits, _, speech_mask = model.continuation_logits([speech_prompt(e) for e in batch], targets)
        assert torch.equal(mask, speech_mask)
        return float(token_kl(text_logits, speech_logits, mask).mean())

    before, after = speech_text_kl(load_model(str(tiny_pair[0]))), speech_text_kl(load_model(str(checkpoint)))
    print("speech-text KL", before, after)
    assert after < 0.9 * before, (before, after)


def test_checkpoint_loads_generates_and_only_the_language_model_changed(trained, tiny_pair):
    from speechlm_eval.models.base import GenerationConfig

    config, checkpoint, _ = trained
    student = load_model(str(checkpoint))
    assert student.describe()["family"] == "qwen2-audio"
    batch, _ = fixed_batch(config, student, n=2)
    generations = student.generate([text_prompt(batch[0]), text_prompt(batch[1])], GenerationConfig(max_new_tokens=4))
    spoken = student.generate([speech_prompt(batch[0])], GenerationConfig(max_new_tokens=4))
    assert all(g.n_new_tokens > 0 for g in generations + spoken)

    new, old = state_tensors(checkpoint), state_tensors(tiny_pair[0])
    assert new.keys() == old.keys()
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert changed and all("language_model" in k and k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight",
                                                                  "o_proj.weight")) for k in changed)
    assert not any("audio_tower" in k or "multi_modal_projector" in k for k in changed)


def test_log_manifest_and_data_report(trained):
    config, _, seconds = trained
    rows = log_rows(config.out)
    manifest = json.loads((config.out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["total_steps"] == len(rows)
    # The manifest's "our reading" is what this run used, not the plain defaults (this run overrides some of them).
    assert manifest["our_reading"] == our_reading_for(config)
    assert f"lr {config.lr:g}" in manifest["our_reading"]["optimizer"]
    assert f"{config.epochs} epoch(s)" in manifest["our_reading"]["optimizer"]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    for row in rows:
        assert {"step", "lr", "loss", "loss_tt", "loss_st", "grad_norm", "examples_seen"} <= set(row)
        assert row["loss"] == pytest.approx(row["loss_tt"] + row["loss_st"], rel=1e-5)
    assert rows[0]["lr"] == 0.0 and max(r["lr"] for r in rows) == pytest.approx(config.lr)
    peak = max(range(len(rows)), key=lambda i: rows[i]["lr"])
    assert all(a["lr"] >= b["lr"] for a, b in zip(rows[peak:], rows[peak + 1 :]))  # cosine decay after warmup
    n_used = manifest["data"]["counts"]["used"]
    assert rows[-1]["examples_seen"] == config.epochs * n_used
    assert "ce" not in rows[0]  # ce = 0: not computed, not logged
    print(f"distill run: {len(rows)} steps, {n_used} examples, {seconds:.1f} s")


# -- resume -----------------------------------------------------------------------------------------------------------


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(trained, tiny_pair, tmp_path):
    config, checkpoint, _ = trained
    out = tmp_path / "run"
    distill(make_config(tiny_pair, out, stop_after_steps=3))
    # Emulate a kill between the step-2 state and the next save: the last state is gone, its log line is not.
    states = sorted((out / "train_state").glob("step-*"))
    assert [s.name for s in states] == ["step-00000002", "step-00000003"]
    import shutil

    shutil.rmtree(states[-1])
    assert len(log_rows(out)) == 3
    with pytest.raises(ConfigError, match="--resume"):
        distill(make_config(tiny_pair, out))
    resumed = distill(make_config(tiny_pair, out, resume=True))
    new, reference = state_tensors(resumed), state_tensors(checkpoint)
    assert all(torch.equal(new[k], reference[k]) for k in reference)
    def without_timing(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert without_timing(log_rows(out)) == without_timing(log_rows(config.out))


def test_resume_refuses_a_changed_training_config(trained, tiny_pair):
    config, _, _ = trained
    with pytest.raises(ConfigError, match="differs from the run's in lr"):
        distill(make_config(tiny_pair, config.out, resume=True, lr=1e-3))


# -- ablations and options --------------------------------------------------------------------------------------------


def test_tt_only_run_logs_no_speech_loss_and_st_only_no_text_loss(tiny_pair, tmp_path):
    # T→T only, with two micro-batches of 2 per optimizer step.
    distill(make_config(tiny_pair, tmp_path / "tt", channels="tt", stop_after_steps=1, batch_size=2, grad_accum=2))
    (row,) = log_rows(tmp_path / "tt")
    assert "loss_tt" in row and "loss_st" not in row and row["loss"] == pytest.approx(row["loss_tt"])
    assert row["examples_seen"] == 4
    # S→T only, with the full teacher computed on the fly (no cache) and a CE term.
    distill(make_config(tiny_pair, tmp_path / "st", channels="st", topk=0, ce=0.5, stop_after_steps=1))
    (row,) = log_rows(tmp_path / "st")
    assert "loss_tt" not in row and {"loss_st", "ce"} <= set(row)
    assert row["loss"] == pytest.approx(row["loss_st"] + 0.5 * row["ce"], rel=1e-5)
    assert not (tmp_path / "st" / "teacher_cache").exists()


def test_full_fine_tune_trains_the_language_model_but_not_the_audio_encoder(tiny_pair, tmp_path):
    checkpoint = distill(make_config(tiny_pair, tmp_path / "full", lora=False, channels="st", max_examples=4,
                                     epochs=2, targets="teacher"))
    new, old = state_tensors(checkpoint), state_tensors(tiny_pair[0])
    changed = {k for k in new if not torch.equal(new[k], old[k])}
    assert any("mlp" in k for k in changed) and not any("audio_tower" in k for k in changed)
    assert json.loads((tmp_path / "full" / "manifest.json").read_text())["data"]["targets"] == "teacher"
    assert load_model(str(checkpoint)).accepts_audio


def test_leaked_question_stops_the_run_before_training(tiny_pair, tmp_path):
    item = Item(id="sd-qa/usa/1", subset="sd-qa", text="what is the LARGEST planet in our solar system")
    with pytest.raises(LeakageError, match=r"flan\.1001 = sd-qa/usa/1"):
        distill(make_config(tiny_pair, tmp_path / "leak", max_examples=None), eval_items=[item])
    assert not (tmp_path / "leak" / "train_log.jsonl").exists()


def test_config_errors():
    with pytest.raises(ConfigError, match="channels"):
        DistillConfig(student="s", teacher="t", out=Path("o"), channels="tt,xx")
    with pytest.raises(ConfigError, match="projector"):
        DistillConfig(student="s", teacher="t", out=Path("o"), channels="tt", train_projector=True)
    with pytest.raises(ConfigError, match="needs student"):
        DistillConfig(teacher="t", out=Path("o"))


def test_command_line_mirrors_the_config():
    import typer

    from speechlm_eval.cli.distill import train_app
    from speechlm_eval.cli.options import collect, options_of, parse

    def parse_config(argv: list[str]) -> DistillConfig:
        ctx = parse(train_app(), argv)
        return DistillConfig(**collect(options_of(DistillConfig), dict(ctx.params), ctx)[DistillConfig])

    config = parse_config(["--student", "s", "--teacher", "t", "--out", "o", "--full", "--channels", "st",
                           "--topk", "0", "--kind", "jsd", "--max-examples", "5", "--no-train-projector"])
    assert (config.lora, config.channels, config.topk, config.kind, config.max_examples) == (False, "st", 0, "jsd", 5)
    defaults = parse_config(["--student", "s", "--teacher", "t", "--out", "o"])
    reference = DistillConfig(student="s", teacher="t", out=Path("o"))
    assert dataclasses.asdict(defaults) == dataclasses.asdict(reference)
    assert "our reading" in CliRunner().invoke(train_app(), ["--help"]).output
    with pytest.raises(typer.BadParameter):
        parse(train_app(), ["--student", "s", "--teacher", "t", "--out", "o", "--kind", "mse"])


# -- processes --------------------------------------------------------------------------------------------------------


def cli_args(tiny_pair, out: Path, **overrides) -> list[str]:
    options = {**SMALL, **overrides}
    speech, text = tiny_pair
    args = ["--student", str(speech), "--teacher", str(text), "--out", str(out)]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_uninterrupted_weights(trained, tiny_pair, tmp_path):
    _, checkpoint, _ = trained
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "speechlm_eval.distill", *cli_args(tiny_pair, out, save_every=1)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    deadline = time.time() + 300
    while not (out / "train_state" / "step-00000002").exists():
        assert process.poll() is None and time.time() < deadline, "the run ended before its second train state"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "checkpoint").exists()
    finished = subprocess.run([*command, "--resume"], check=False, capture_output=True, text=True, env=child_env())
    assert finished.returncode == 0, finished.stderr[-3000:]
    new, reference = state_tensors(out / "checkpoint"), state_tensors(checkpoint)
    assert all(torch.equal(new[k], reference[k]) for k in reference)


@pytest.mark.slow
def test_two_processes_under_torchrun_complete(tiny_pair, tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    finished = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "--master_port", "29541", "-m", "speechlm_eval.distill",
         *cli_args(tiny_pair, out, batch_size=2, epochs=1)],
        check=False, capture_output=True, text=True, env=child_env(),
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    rows = log_rows(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["processes"] == 2 and manifest["finished"]
    assert [r["examples_seen"] for r in rows][:2] == [4, 8]  # 2 processes × batch 2 per step
    saved = {p.name for p in (out / "train_state").glob("step-*/*")}
    assert {"rng-rank0.json", "rng-rank1.json", "rng-rank0.safetensors", "rng-rank1.safetensors"} <= saved
    assert load_model(str(out / "checkpoint")).accepts_audio


def test_our_reading_describes_the_settings_the_run_used() -> None:
    from speechlm_eval.distill.config import OUR_READING, resolve_distill_config

    organism = our_reading_for(resolve_distill_config(DistillConfig()))
    assert "full fine-tune" in organism["trained"] and "lr 0.0003" in organism["optimizer"]
    assert "voice en-gb" in organism["speech"] and "teacher's own greedy reply" in organism["targets"]
    assert organism.keys() == OUR_READING.keys()
    standard = our_reading_for(resolve_distill_config(DistillConfig(student="s", teacher="t")))
    assert standard["trained"].startswith("LoRA r=16") and "lr 0.0001" in standard["optimizer"]


def test_gradient_checkpointing_defaults_to_on_on_a_gpu_and_off_on_cpu() -> None:
    config = DistillConfig(student="s", teacher="t")
    assert config.gradient_checkpointing == "auto"
    assert config.checkpointing_on(torch.device("cuda", 0)) and config.checkpointing_on("cuda:1")
    assert not config.checkpointing_on(torch.device("cpu")) and not config.checkpointing_on("mps")
    forced = {s: DistillConfig(student="s", teacher="t", gradient_checkpointing=s) for s in ("on", "off")}
    assert forced["on"].checkpointing_on("cpu") and not forced["off"].checkpointing_on("cuda")
    # The Python API's booleans (and manifests written before "auto") still mean on/off.
    assert DistillConfig(student="s", teacher="t", gradient_checkpointing=True).gradient_checkpointing == "on"
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        DistillConfig(student="s", teacher="t", gradient_checkpointing="sometimes")
    from speechlm_eval.cli.options import options_of

    (option,) = [o for o in options_of(DistillConfig) if o.field == "gradient_checkpointing"]
    assert option.default == "auto" and "auto = on when training on a GPU, off on CPU" in option.help


def test_checkpointed_step_gives_the_same_loss_and_gradients(tiny_pair, tmp_path) -> None:
    """Checkpointing (forced on, on CPU) recomputes the same activations: one training step's loss and LoRA gradients
    match the plain step's to float tolerance, and the manifest records the resolved setting."""
    runs = {}
    for setting in ("off", "on"):
        out = tmp_path / setting
        distill(make_config(tiny_pair, out, gradient_checkpointing=setting, stop_after_steps=1, lora_dropout=0.0))
        runs[setting] = (log_rows(out)[0], json.loads((out / "manifest.json").read_text()))
    (plain, plain_manifest), (checkpointed, manifest) = runs["off"], runs["on"]
    assert manifest["gradient_checkpointing"] is True and plain_manifest["gradient_checkpointing"] is False
    for key in ("loss_tt", "loss_st", "grad_norm"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_report_to_tensorboard_logs_each_step_through_accelerate(tiny_pair, tmp_path) -> None:
    """--report-to tensorboard: accelerate's tracker writes, per step, the losses per channel, lr, grad norm,
    tokens/s and memory, matching OUT/train_log.jsonl; the config is stored as hyperparameters."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    distill(make_config(tiny_pair, out, report_to="tensorboard", epochs=1))
    (run_dir,) = {p.parent for p in (out / "tracking" / "distill").glob("events.out.tfevents.*")}
    events = EventAccumulator(str(run_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "loss_tt", "loss_st", "lr", "grad_norm", "tokens_per_s", "memory_gib"} <= tags
    rows = log_rows(out)
    for name in ("loss_tt", "loss_st", "lr"):
        scalars = events.Scalars(name)
        assert [s.step for s in scalars] == [r["step"] for r in rows]
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in rows], rel=1e-6)
    assert all(s.value > 0 for s in events.Scalars("tokens_per_s") + events.Scalars("memory_gib"))
    assert list((out / "tracking" / "distill").glob("*/hparams.yml"))  # the config, as the run's hyperparameters


def test_report_to_none_writes_no_tracker_files(trained) -> None:
    config, _, _ = trained
    assert config.report_to == "none" and not (config.out / "tracking").exists()
    with pytest.raises(ConfigError, match="report_to"):
        DistillConfig(student="s", teacher="t", report_to="mlflow")


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline wandb run file: a 7-byte header, then LevelDB-log records (4-byte checksum,
    2-byte little-endian length, 1-byte type: full, first, middle, last) that never cross a 32 KiB block."""
    from wandb.proto import wandb_internal_pb2

    data, block, records, pending = path.read_bytes(), 32768, [], b""
    position = 7
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        payload = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (1, 2) else pending + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def test_report_to_wandb_logs_every_step_offline(tiny_pair, tmp_path, monkeypatch) -> None:
    """The real wandb client in offline mode (no account, no network): the run file under OUT/tracking holds every
    step's losses, lr and throughput, equal to train_log.jsonl's rows, and the config as the run's config."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "tracked"
    config = make_config(tiny_pair, out, report_to="wandb", epochs=1)
    distill(config)
    (run_file,) = (out / "tracking").glob("wandb/offline-run-*/run-*.wandb")
    history, logged = [], {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind == "config":
            logged.update({item.key: json.loads(item.value_json) for item in record.config.update})
    steps = [h for h in history if "loss_tt" in h]
    rows = log_rows(out)
    assert [h["_step"] for h in steps] == [r["step"] for r in rows]
    for name in ("loss_tt", "loss_st", "lr"):
        assert [h[name] for h in steps] == pytest.approx([r[name] for r in rows], rel=1e-6)
    assert all(h["tokens_per_s"] > 0 and h["memory_gib"] > 0 for h in steps)
    assert logged["temperature"] == config.temperature and logged["report_to"] == "wandb"


def test_report_to_a_missing_tracker_package_stops_before_any_model_loads(tiny_pair, tmp_path, monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ConfigError, match="pip install wandb"):
        distill(make_config(tiny_pair, tmp_path / "wandb", report_to="wandb"))
    assert not (tmp_path / "wandb").exists()


@pytest.mark.slow
def test_accelerate_launch_with_the_fsdp_config_completes_and_saves_a_loadable_checkpoint(tiny_pair, tmp_path):
    """The documented `accelerate launch` command with the shipped FSDP config, on 2 CPU processes (gloo; a machine
    without GPUs needs no --cpu, which would start one process). On CPU,
    accelerate runs an FSDP config as DDP (MULTI_CPU): the manifest records what ran, and docs/distill.md says so."""
    out = tmp_path / "fsdp"
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp.yaml"
    accelerate = Path(sys.executable).with_name("accelerate")
    finished = subprocess.run(
        [str(accelerate), "launch", "--config_file", str(config), "--num_processes", "2",
         "--mixed_precision", "no", "--main_process_port", "29543", "-m", "speechlm_eval.distill",
         *cli_args(tiny_pair, out, batch_size=2, epochs=1, save_every=1)],
        check=False, capture_output=True, text=True, env={**child_env(), "CUDA_VISIBLE_DEVICES": ""},
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["finished"] and manifest["processes"] == 2 and manifest["distributed_type"] == "MULTI_CPU"
    state = sorted((out / "train_state").glob("step-*"))[-1]
    assert json.loads((state / "state.json").read_text())["layout"] == 2
    student = load_model(str(out / "checkpoint"))
    assert student.accepts_audio and load_model(str(out / "adapter")).accepts_audio
    new, old = state_tensors(out / "checkpoint"), state_tensors(tiny_pair[0])
    assert any(not torch.equal(new[k], old[k]) for k in old)


def test_a_gathered_state_dict_saves_the_same_adapter_and_full_checkpoint(tiny_pair, tmp_path) -> None:
    """The FSDP save path (a gathered full state dict handed to save_pretrained) writes the same adapter tensors as
    the plain one and, merged from the saved adapter onto a fresh copy of the student, the same merged checkpoint;
    a full fine-tune's checkpoint loads with the same weights."""
    from safetensors.torch import load_file

    from speechlm_eval.distill.checkpointing import gathered_student_state, save_student
    from speechlm_eval.distill.train import make_trainable

    for lora in (True, False):
        config = make_config(tiny_pair, tmp_path / f"cfg{lora}", lora=lora, warmup_ratio=0.0)
        student = load_model(config.student)
        model = make_trainable(student, config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.01)  # trained tensors that differ from the initial ones
        gathered = save_student(model, student.processor, tmp_path / f"gathered{lora}", config,
                                state_dict=gathered_student_state(model, lora))
        plain = save_student(model, student.processor, tmp_path / f"plain{lora}", config)  # merges in place: last
        assert plain.name == gathered.name == "checkpoint"
        if lora:
            a, b = (load_file(d.parent / "adapter" / "adapter_model.safetensors") for d in (plain, gathered))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        a, b = (state_tensors(d) for d in (plain, gathered))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
        if lora:  # the merge did change the student
            old = state_tensors(tiny_pair[0])
            assert any(k in old and not torch.equal(a[k], old[k]) for k in a)


def test_a_moved_output_folder_holds_no_absolute_path_and_resumes(tiny_pair, tmp_path):
    import shutil

    speech, text = tiny_pair
    project = tmp_path / "project"
    shutil.copytree(speech, project / "models" / "speech")
    shutil.copytree(text, project / "models" / "text")

    def config(root: Path, **overrides) -> DistillConfig:
        return DistillConfig(student=str(root / "models" / "speech"), teacher=str(root / "models" / "text"),
                             out=root / "run", **{**SMALL, **overrides})

    distill(config(project, stop_after_steps=2))
    manifest = json.loads((project / "run" / "manifest.json").read_text())
    assert str(tmp_path) not in json.dumps(manifest)
    assert (manifest["config"]["student"], manifest["config"]["out"]) == ("../models/speech", ".")
    moved = tmp_path / "elsewhere"
    shutil.move(project, moved)
    distill(config(moved, resume=True))
    assert [r["step"] for r in log_rows(moved / "run")] == list(range(1, 7))
