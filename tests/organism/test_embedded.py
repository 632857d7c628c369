"""The embedded default end to end: `gap` and `distill` with no model arguments run the shipped model organism.

These are the organism's claims, measured through the product's own commands on the shipped weights (seed 0): the
speech stage caused forgetting and inequivalence (95% CIs excluding 0), the speech LLM hears the entity names on the
held-out voice, distillation with default settings shrinks forgetting significantly, and reruns are byte-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from speechlm_eval import embedded
from speechlm_eval.cli import app
from speechlm_eval.organism.layout import is_built

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed"),
]
SUBSET = "organism_mcq"


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def default_gap(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("embedded") / "gap"
    invoke("gap", "--out", str(out))
    return out


def test_the_organism_ships_with_the_package() -> None:
    assert is_built(embedded.embedded_dir())
    sizes = sum(f.stat().st_size for f in embedded.embedded_dir().rglob("*") if f.is_file())
    assert sizes <= 20 * 2**20


def test_default_gap_shows_forgetting_and_inequivalence_of_a_hearing_model(default_gap: Path) -> None:
    results = json.loads((default_gap / "results.json").read_text())
    subset = results["subsets"][SUBSET]
    assert subset["n"] >= 100
    for gap in ("forgetting", "inequivalence"):
        assert subset[gap]["ci_low"] > 0, (gap, subset[gap])
    perception = results["diagnostics"]["perception"]["subsets"][SUBSET]
    assert perception["key_phrase_heard"] >= 0.8 and perception["key_phrase_n"] == subset["n"]
    report = (default_gap / "report.md").read_text()
    assert "model organism" in report and "key phrase" in report


def test_default_gap_scores_file_lists_exactly_the_items_better_typed_than_spoken(default_gap: Path) -> None:
    """scores.jsonl answers "which items flipped" on its own; checked against the records scored independently here,
    and against the explorer in report.html."""
    from html.parser import HTMLParser

    from speechlm_eval.rundir import RunDir
    from speechlm_eval.scoring.base import item_rng
    from speechlm_eval.scoring.registry import get_scorer

    run = RunDir(default_gap)
    seed = run.read_manifest().seed
    typed, spoken = run.records("speech_llm_text"), run.records("speech_llm_speech")
    expected = set()
    for item in run.items():
        score = get_scorer(item.scorer).score
        a = score(item, typed[item.id]["response"], item_rng(seed, item.id, "speech_llm_text")).value
        b = score(item, spoken[item.id]["response"], item_rng(seed, item.id, "speech_llm_speech")).value
        if a > b:
            expected.add(item.id)
    rows = run.scores()
    listed = {r["id"] for r in rows if (r["gaps"]["inequivalence"] or 0) > 0}
    assert listed == expected and len(expected) >= 30
    assert all(r["arms"]["speech_llm_text"]["score"] > r["arms"]["speech_llm_speech"]["score"] for r in rows
               if r["id"] in listed)

    class Items(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.flipped: set[str] = set()

        def handle_starttag(self, tag: str, attrs: list) -> None:
            attrs = dict(attrs)
            if tag == "li" and "ineq" in (attrs.get("class") or "").split():
                self.flipped.add(attrs["data-id"])

    parser = Items()
    parser.feed((default_gap / "report.html").read_text(encoding="utf-8"))
    assert parser.flipped == expected
    assert f"right typed, wrong spoken ({len(expected)})" in (default_gap / "report.html").read_text()


def test_default_gap_is_identical_on_rerun(default_gap: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    invoke("gap", "--out", str(again))
    for name in ("results.json", "report.md", "items.jsonl", "records/speech_llm_speech.jsonl",
                 "records/perception.jsonl", "scores.jsonl", "report.html"):
        assert (again / name).read_bytes() == (default_gap / name).read_bytes(), name


def test_default_distill_shrinks_forgetting_significantly(tmp_path: Path) -> None:
    """`speechlm-eval distill` with no arguments repairs the organism: forgetting falls, paired test significant."""
    out = tmp_path / "distill"
    invoke("distill", "--out", str(out))
    result = json.loads((out / "comparison.json").read_text())
    forgetting = result["subsets"][SUBSET]["gaps"]["forgetting"]
    assert forgetting["change"] < 0 and forgetting["ci_high"] < 0 and forgetting["p_value"] < 0.05, forgetting
    assert (out / "report.md").exists() and (out / "report.html").exists()


def test_default_distill_is_identical_on_rerun(tmp_path: Path) -> None:
    """Two organism distillations with the same seed (shortened to 2 epochs to keep the suite fast) give the same
    weights, records and comparison, byte for byte."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        invoke("distill", "--out", str(out), "--epochs", "2")
    for name in ("checkpoint/model.safetensors", "comparison.json", "report.md", "after/results.json",
                 "after/records/speech_llm_speech.jsonl", "train_log.jsonl"):
        # The run directory's own path appears in manifests and reports: compare with it masked.
        first, second = ((run / name).read_bytes().replace(str(run).encode(), b"RUN") for run in runs)
        if name == "train_log.jsonl":  # per-step wall-clock seconds differ; everything else must not
            first, second = (_without_seconds(b) for b in (first, second))
        assert first == second, name


def _without_seconds(log: bytes) -> list[dict]:
    rows = [json.loads(line) for line in log.decode().splitlines()]
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]
