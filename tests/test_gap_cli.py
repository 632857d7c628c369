"""`speechlm-eval gap` end to end through the CLI, on real tiny models and the bundled suite (espeak-ng TTS)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from typer.testing import CliRunner

from speechlm_eval.cli import app
from speechlm_eval.rundir import ARMS
from tests.data import fakes
from tests.fixtures.kill import kill_after_lines

pytestmark = pytest.mark.slow
runner = CliRunner()


def gap(*args: str) -> "CliRunner.invoke":
    return runner.invoke(app, ["gap", *args], catch_exceptions=False)


def model_args(pair: tuple[Path, Path]) -> list[str]:
    return ["--model", str(pair[0]), "--text-model", str(pair[1])]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(tiny_pair, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    result = gap(*model_args(tiny_pair), "--suite", "bundled", "--out", str(out), "--max-new-tokens", "16")
    assert result.exit_code == 0, result.output
    return out


def test_three_arms_records_results_and_manifest(full_run):
    items = read_lines(full_run / "items.jsonl")
    speech_only = [i for i in items if i["audio_instruction"] is not None]
    assert speech_only and all(i["subset"] == "mmau" for i in speech_only)
    for arm in ARMS:
        records = read_lines(full_run / "records" / f"{arm}.jsonl")
        expected = items if arm == "speech_llm_speech" else [i for i in items if i["audio_instruction"] is None]
        assert [r["id"] for r in records] == [i["id"] for i in expected]  # item order, one record each
        assert all(r["error"] is None and isinstance(r["response"], str) for r in records)
    results = json.loads((full_run / "results.json").read_text())
    assert results["schema"] == "speechlm-eval/results/v1"
    obqa = results["subsets"]["openbookqa"]
    assert set(obqa["arms"]) == set(ARMS) and obqa["metric"] == "acc"
    assert {"value", "ci_low", "ci_high", "p_value"} <= set(obqa["forgetting"])
    assert set(results["subsets"]["mmau"]["arms"]) == {"speech_llm_speech"}
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert manifest["generation"] == {"max_new_tokens": 16, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                                      "seed": 0}
    assert manifest["models"]["speech_llm"]["family"] == "qwen2-audio"
    assert manifest["models"]["text_llm"]["family"] == "hf-causal"
    assert manifest["tts"]["engine"] == "espeak-ng" and manifest["packages"]["torch"]
    assert "mmau" in (full_run / "report.md").read_text()


def test_same_seed_gives_identical_results(full_run, tiny_pair, tmp_path):
    again = tmp_path / "again"
    assert gap(*model_args(tiny_pair), "--suite", "bundled", "--out", str(again), "--max-new-tokens", "16").exit_code == 0
    for name in ("results.json", "manifest.json", "items.jsonl", "report.md", *(f"records/{a}.jsonl" for a in ARMS)):
        assert (again / name).read_bytes() == (full_run / name).read_bytes(), name


def test_resume_recomputes_nothing_and_completes_the_run(full_run, tiny_pair, tmp_path):
    cut = tmp_path / "cut"
    shutil.copytree(full_run, cut)
    (cut / "results.json").unlink()
    path = cut / "records" / "speech_llm_text.jsonl"
    lines = path.read_text().splitlines()
    kept = [json.loads(line) for line in lines[: len(lines) // 2]]
    kept[0]["response"] = "SENTINEL"  # a resumed run must keep, not recompute, what was already written
    path.write_text("".join(json.dumps(r) + "\n" for r in kept) + lines[len(lines) // 2][:20])  # + a torn line
    (cut / "records" / "speech_llm_speech.jsonl").unlink()
    result = gap(*model_args(tiny_pair), "--suite", "bundled", "--out", str(cut), "--max-new-tokens", "16", "--resume")
    assert result.exit_code == 0, result.output
    resumed = read_lines(path)
    original = read_lines(full_run / "records" / "speech_llm_text.jsonl")
    assert [r["id"] for r in resumed] == [r["id"] for r in original]
    assert resumed[0]["response"] == "SENTINEL"
    assert resumed[1:] == original[1:]
    for arm in ("text_llm_text", "speech_llm_speech"):
        assert (cut / "records" / f"{arm}.jsonl").read_bytes() == (full_run / "records" / f"{arm}.jsonl").read_bytes()


def test_killed_run_resumes_to_the_same_records(full_run, tiny_pair, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "speechlm_eval.cli", "gap", *model_args(tiny_pair), "--suite", "bundled",
               "--out", str(out), "--max-new-tokens", "16", "--batch-size", "1"]
    target = out / "records" / "speech_llm_text.jsonl"
    kill_after_lines(command, target)
    assert not (out / "results.json").exists()
    done_before = target.read_text().count("\n")
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    for arm in ARMS:
        assert (out / "records" / f"{arm}.jsonl").read_bytes() == (full_run / "records" / f"{arm}.jsonl").read_bytes()
    assert done_before < len(read_lines(target))


def test_existing_run_needs_resume_or_overwrite_and_resume_must_match(full_run, tiny_pair, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    result = runner.invoke(app, ["gap", *model_args(tiny_pair), "--suite", "bundled", "--out", str(copy)])
    assert result.exit_code == 2 and "--resume" in result.output
    result = runner.invoke(app, ["gap", *model_args(tiny_pair), "--suite", "bundled", "--out", str(copy),
                                 "--max-new-tokens", "8", "--resume"])
    assert result.exit_code == 2 and "generation" in result.output


def test_configuration_errors_stop_before_models_load(tiny_pair, tmp_path):
    result = runner.invoke(app, ["gap", *model_args(tiny_pair), "--suite", "voicebench:nosuch", "--out",
                                 str(tmp_path / "a")])
    assert result.exit_code == 2 and "nosuch" in result.output
    assert not (tmp_path / "a").exists()
    result = runner.invoke(app, ["gap", "--model", str(tmp_path / "missing"), "--suite", "bundled",
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "does not exist" in result.output
    result = runner.invoke(app, ["gap", "--model", str(tiny_pair[1]), "--suite", "bundled", "--out",
                                 str(tmp_path / "c")])
    assert result.exit_code == 2 and "text-only" in result.output


def long_clip_copy(root: Path) -> Path:
    """A local VoiceBench copy: fakes' openbookqa (row 2 is corrupt audio) plus one clip longer than the window."""
    fakes.build(root, "parquet")
    rows = {"prompt": ["A very long question. A. x B. y C. z D. w"], "reference": ["A"],
            "audio": [{"bytes": fakes.wav_bytes(fakes.tone(16_000, 16_000 * 11), 16_000), "path": "long.wav"}]}
    table = datasets.Dataset.from_dict(rows).cast_column("audio", datasets.Audio())
    table.to_parquet(str(root / "openbookqa" / "test-00001-of-00002.parquet"))
    return root


def test_bad_audio_becomes_error_records_and_the_run_goes_on(tiny_pair, tmp_path):
    data = long_clip_copy(tmp_path / "vb")
    out = tmp_path / "run"
    result = gap(*model_args(tiny_pair), "--suite", "voicebench:openbookqa", "--data-dir", str(data),
                 "--out", str(out), "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    records = {r["id"]: r for r in read_lines(out / "records" / "speech_llm_speech.jsonl")}
    errors = {i: r["error"]["message"] for i, r in records.items() if r["error"]}
    assert len(records) == 4 and len(errors) == 3
    assert "too short to encode" in errors["openbookqa/test/1"]  # 800 samples = 0.05 s
    assert "broken.wav" in errors["openbookqa/test/2"]
    assert "encoder window" in errors["openbookqa/test/3"]
    text_records = read_lines(out / "records" / "speech_llm_text.jsonl")
    assert len(text_records) == 4 and all(r["error"] is None for r in text_records)
    arm = json.loads((out / "results.json").read_text())["subsets"]["openbookqa"]["arms"]["speech_llm_speech"]
    assert arm["errors"] == 3 and arm["n"] == 1


def test_help_documents_every_option():
    result = runner.invoke(app, ["gap", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    import typer.main

    command = typer.main.get_command(app).commands["gap"]  # type: ignore[attr-defined]
    for param in command.params:
        assert param.help, f"--{param.name} has no help"
        assert param.opts[0] in result.output


def test_without_text_model_the_report_says_forgetting_is_not_measured(tiny_pair, tmp_path):
    out = tmp_path / "solo"
    result = gap("--model", str(tiny_pair[0]), "--suite", "bundled:openbookqa", "--out", str(out),
                 "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert not (out / "records" / "text_llm_text.jsonl").exists()
    assert "forgetting is not measured" in (out / "report.md").read_text()


def test_two_processes_under_torchrun_give_the_single_process_records(tmp_path):
    """Two ranks give the records of one process, on the embedded organism: a trained pair whose answers are
    confident. (On a tiny *random* pair, whose logits are nearly tied everywhere, a last-bit difference between two
    processes' kernels, e.g. from memory alignment or reduction order, flips a greedy token now and then.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    gap_args = ["gap", "--limit", "48"]
    single_out, out = tmp_path / "single", tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    for command in ([sys.executable, "-m", "speechlm_eval.cli", *gap_args, "--out", str(single_out)],
                    [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "speechlm_eval.cli",
                     *gap_args, "--out", str(out)]):
        finished = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert finished.returncode == 0, finished.stderr[-3000:]
    assert json.loads((out / "manifest.json").read_text())["world_size"] == 2
    expected = sorted(f"{name}.jsonl" for name in (*ARMS, "diagnostics", "perception"))
    assert sorted(p.name for p in (out / "records").iterdir()) == expected  # rank files merged away
    for arm in (*ARMS, "perception"):
        assert (out / "records" / f"{arm}.jsonl").read_bytes() == (single_out / "records" / f"{arm}.jsonl").read_bytes()
    single = json.loads((single_out / "results.json").read_text())
    double = json.loads((out / "results.json").read_text())
    assert double["subsets"] == single["subsets"]


def test_report_rebuilds_byte_identical_files_from_records_alone(full_run, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(full_run, copy)
    plots = sorted(p.relative_to(full_run).as_posix() for p in (full_run / "plots").glob("*.png"))
    assert "plots/arm-scores-per-subset.png" in plots and all(f"]({p})" in (full_run / "report.md").read_text()
                                                              for p in plots)
    shutil.rmtree(copy / "plots")
    for name in ("results.json", "report.md", "report.html"):
        (copy / name).unlink()
    result = runner.invoke(app, ["report", str(copy)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for name in ("results.json", "report.md", "report.html", *plots):
        assert (copy / name).read_bytes() == (full_run / name).read_bytes(), name


def test_diagnostics_records_and_summaries(full_run):
    items = [i for i in read_lines(full_run / "items.jsonl") if i["audio_instruction"] is None]
    diagnostics = read_lines(full_run / "records" / "diagnostics.jsonl")
    perception = read_lines(full_run / "records" / "perception.jsonl")
    assert [r["id"] for r in perception] == [i["id"] for i in items]
    assert all(0.0 <= r["wer"] for r in perception if r["error"] is None)
    ok = [r for r in diagnostics if r["error"] is None]
    assert ok and all(r["kl_text_vs_speech"] > 0 and 0 <= r["jsd_text_vs_speech"] <= np.log(2) + 1e-6 for r in ok)
    assert all(r["kl_text_llm_vs_speech_llm"] > 0 for r in ok)  # the student LM is the text LM plus noise
    results = json.loads((full_run / "results.json").read_text())
    assert set(results["diagnostics"]) == {"distribution", "perception"}
    assert results["diagnostics"]["perception"]["inequivalence"]["openbookqa"]
    report = (full_run / "report.md").read_text()
    assert "## Perception probe" in report and "## Distribution gaps" in report


def test_identical_backbone_shows_zero_text_llm_divergence(tiny_identical_pair, tmp_path):
    out = tmp_path / "same"
    result = gap(*model_args(tiny_identical_pair), "--suite", "bundled:openbookqa,bbh", "--out", str(out),
                 "--max-new-tokens", "8")
    assert result.exit_code == 0, result.output
    ok = [r for r in read_lines(out / "records" / "diagnostics.jsonl") if r["error"] is None]
    assert len(ok) == 8
    assert all(abs(r["kl_text_llm_vs_speech_llm"]) < 1e-5 for r in ok)
    assert all(r["kl_text_vs_speech"] > 1e-3 for r in ok)
    forgetting = json.loads((out / "results.json").read_text())["subsets"]["openbookqa"]["forgetting"]
    assert forgetting["value"] == 0.0  # identical text paths answer identically


def test_lm_eval_tasks_join_the_same_results_and_report(tiny_pair, tmp_path):
    out = tmp_path / "lmeval"
    tasks = Path(__file__).parent / "lmeval" / "tasks"
    result = gap(*model_args(tiny_pair), "--suite", "bundled:openbookqa", "--out", str(out), "--max-new-tokens", "4",
                 "--lm-eval-tasks", "speechlm_tiny_mc", "--lm-eval-include", str(tasks), "--no-diagnostics")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    # One prompt format per row: lm-eval's prompt (forgetting), the chat template's log-likelihoods (inequivalence).
    task = results["subsets"]["lmeval:speechlm_tiny_mc"]
    spoken = results["subsets"]["lmeval:speechlm_tiny_mc (spoken, log-lik.)"]
    assert set(task["arms"]) == {"text_llm_text", "speech_llm_text"}
    assert set(spoken["arms"]) == {"speech_llm_speech_ll", "speech_llm_text_ll"}
    assert task["forgetting"]["n"] == 12 and spoken["inequivalence"]["n"] == 11  # one question is too long to speak
    assert "inequivalence" not in task and "forgetting" not in spoken
    assert set(results["overall"]["arms"]) == {"text_llm_text", "speech_llm_text", "speech_llm_speech"}
    assert "## lm-eval: spoken vs typed" in (out / "report.md").read_text()


def test_the_attention_kernel_is_chosen_recorded_and_changes_no_answer(full_run, tiny_pair, tmp_path):
    """Default: transformers' choice (sdpa), in the manifest; --attn-implementation eager loads both models with the
    eager kernel, is part of what a resumed run must match, and answers the same greedy answers."""
    manifest = json.loads((full_run / "manifest.json").read_text())
    assert {m["attn_implementation"] for m in manifest["models"].values()} == {"sdpa"}
    out = tmp_path / "eager"
    result = gap(*model_args(tiny_pair), "--suite", "bundled", "--out", str(out), "--max-new-tokens", "16",
                 "--attn-implementation", "eager", "--no-diagnostics")
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert {m["attn_implementation"] for m in manifest["models"].values()} == {"eager"}
    assert manifest["request"]["attn_implementation"] == "eager"
    for arm in ARMS:
        answers = [r["response"] for r in read_lines(out / "records" / f"{arm}.jsonl")]
        assert answers == [r["response"] for r in read_lines(full_run / "records" / f"{arm}.jsonl")], arm
