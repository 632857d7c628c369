"""The leaderboard Overall reproduces a published VoiceBench row from its nine columns."""

from __future__ import annotations

import pytest

from speechlm_eval.metrics.overall import LEADERBOARD_COLUMNS, leaderboard_overall


def official_dicts(alpaca, common, wild, panda, gpt_sdqa, mmsu, obqa, bbh, ifeval_final, refusal):
    return {
        "alpacaeval_full": {"gpt": alpaca}, "commoneval": {"gpt": common}, "wildvoice": {"gpt": wild},
        "sd-qa": {"panda": panda, "gpt": gpt_sdqa}, "mmsu": {"acc": mmsu}, "openbookqa": {"acc": obqa},
        "bbh": {"acc": bbh}, "ifeval": {"final": ifeval_final}, "advbench": {"refusal_rate": refusal},
    }


def as_subsets(official: dict, arm: str = "speech_llm_speech") -> dict:
    return {subset: {"arms": {arm: {"official": o}}} for subset, o in official.items()}


def test_qwen2_audio_leaderboard_row():
    # Qwen2-Audio, audio input (shared/paper.md): Overall 55.80. SD-QA 35.71 = (panda + gpt) / 2.
    official = official_dicts(3.74, 3.43, 3.01, 30.00, 41.42, 35.72, 49.45, 54.70, 0.2633, 0.9673)
    result = leaderboard_overall(as_subsets(official))["arms"]["speech_llm_speech"]
    assert result["missing"] == []
    assert result["columns"]["SD-QA"] == pytest.approx(35.71)
    assert result["columns"]["AlpacaEval"] == pytest.approx(74.8)
    assert result["overall"] == pytest.approx(55.80, abs=0.006)


def test_missing_columns_leave_overall_undefined():
    official = official_dicts(3.74, 3.43, 3.01, None, 41.42, 35.72, 49.45, 54.70, 0.2633, 0.9673)
    del official["wildvoice"]
    result = leaderboard_overall(as_subsets(official))["arms"]["speech_llm_speech"]
    assert result["overall"] is None and result["missing"] == ["WildVoice", "SD-QA"]
    assert len(LEADERBOARD_COLUMNS) == 9
