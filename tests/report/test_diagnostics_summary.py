"""Perception split and distribution summaries computed from diagnostic records (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm_eval.metrics.paired import paired_gap
from speechlm_eval.report.diagnostics import WER_BUCKETS, distribution_summary, perception_summary, wer_bucket
from speechlm_eval.scoring.base import Score


def test_wer_buckets_are_inclusive_upper_bounds():
    assert [wer_bucket(w) for w in (0.0, 0.1, 0.1001, 0.3, 0.31, 2.0)] == [0, 0, 1, 1, 2, 2]
    assert len(WER_BUCKETS) == 3


def test_inequivalence_is_split_by_how_well_the_item_was_heard():
    ids = [f"q{i}" for i in range(8)]
    wers = [0.0, 0.05, 0.0, 0.2, 0.5, 0.8, 1.0, 0.0]
    text = [1, 1, 1, 1, 1, 1, 1, 0]
    speech = [1, 0, 1, 1, 0, 0, 0, 0]
    records = [{"id": i, "subset": "obqa", "wer": w, "error": None} for i, w in zip(ids, wers)]
    records.append({"id": "q8", "subset": "obqa", "error": {"type": "AudioError", "message": "bad"}})
    scores = {"obqa": {"speech_llm_text": {i: Score(float(v)) for i, v in zip(ids, text)},
                       "speech_llm_speech": {i: Score(float(v)) for i, v in zip(ids, speech)}}}
    out = perception_summary(records, scores, {"obqa": 100.0}, seed=0, n_resamples=2000)
    entry = out["subsets"]["obqa"]
    assert entry["n"] == 8 and entry["errors"] == 1
    assert entry["mean_wer"] == pytest.approx(np.mean(wers))
    assert entry["bucket_counts"] == [4, 1, 3] and entry["share_heard"] == pytest.approx(0.5)
    heard, partly, misheard = out["inequivalence"]["obqa"]
    expected = paired_gap(np.array([1, 1, 1, 0.0]), np.array([1, 0, 1, 0.0]), scale=100.0, n_resamples=2000, seed=0)
    assert heard == expected.to_dict()
    assert partly["value"] == 0.0 and misheard["value"] == pytest.approx(100.0)


def test_key_phrase_share_only_where_items_name_one():
    from speechlm_eval.diagnostics import phrase_heard

    assert phrase_heard("What color is the Brave Fox? A. red", "brave fox")
    assert not phrase_heard("What color is the brave foxes?", "brave fox")
    records = [{"id": f"k{i}", "subset": "org", "wer": 0.0, "error": None, "key_heard": heard}
               for i, heard in enumerate([True, True, False, True])]
    records.append({"id": "plain", "subset": "obqa", "wer": 0.0, "error": None})
    out = perception_summary(records, {}, {"org": 100.0, "obqa": 100.0}, seed=0, n_resamples=100)["subsets"]
    assert out["org"]["key_phrase_heard"] == pytest.approx(0.75) and out["org"]["key_phrase_n"] == 4
    assert "key_phrase_heard" not in out["obqa"]


def test_distribution_summary_means_and_skips_errors():
    records = [
        {"id": "a", "subset": "s", "error": None, "response_from": "text_llm_text", "kl_text_vs_speech": 0.2,
         "jsd_text_vs_speech": 0.05, "kl_text_llm_vs_speech_llm": 0.0, "jsd_text_llm_vs_speech_llm": 0.0},
        {"id": "b", "subset": "s", "error": None, "response_from": "text_llm_text", "kl_text_vs_speech": 0.4,
         "jsd_text_vs_speech": 0.07, "kl_text_llm_vs_speech_llm": None, "jsd_text_llm_vs_speech_llm": None},
        {"id": "c", "subset": "s", "error": {"type": "X", "message": "m"}},
    ]
    out = distribution_summary(records, seed=0, n_resamples=500)["s"]
    assert out["n"] == 2 and out["errors"] == 1
    assert out["kl_text_vs_speech"]["value"] == pytest.approx(0.3)
    assert out["kl_text_llm_vs_speech_llm"]["n"] == 1
