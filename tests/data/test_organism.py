"""The organism suite as a benchmark: regenerated from the seed, checked against a build's JSONL, torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from speechlm_eval.data.registry import DataError, LoadOptions, SubsetRequest
from speechlm_eval.data.organism import BENCHMARK, load_organism
from speechlm_eval.data.organism_world import EVAL_SUBSET, eval_items, make_world, mcq_rows, write_jsonl


def test_suite_is_the_seeds_eval_split() -> None:
    items = load_organism(SubsetRequest("organism", EVAL_SUBSET, "seed1"), LoadOptions())
    assert [(i.text, i.reference) for i in items] == [(i.text, i.reference) for i in eval_items(make_world(1))]
    assert len(load_organism(SubsetRequest("organism", EVAL_SUBSET), LoadOptions(limit=5))) == 5
    assert BENCHMARK.scorer_for(EVAL_SUBSET) == "mcq"
    with pytest.raises(DataError):
        load_organism(SubsetRequest("organism", EVAL_SUBSET, "test"), LoadOptions())


def test_build_directory_must_match_the_seed(tmp_path) -> None:
    write_jsonl(mcq_rows(make_world(0).eval_mcqs), tmp_path / f"{EVAL_SUBSET}.jsonl")
    request = SubsetRequest("organism", EVAL_SUBSET, "seed0")
    assert len(load_organism(request, LoadOptions(data_dir=str(tmp_path)))) == 144
    with pytest.raises(DataError, match="not the seed-1 suite"):
        load_organism(SubsetRequest("organism", EVAL_SUBSET, "seed1"), LoadOptions(data_dir=str(tmp_path)))


def test_suite_import_stays_free_of_torch() -> None:
    code = "import sys, speechlm_eval.data.organism; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
