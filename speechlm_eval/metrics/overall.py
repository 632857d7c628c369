"""VoiceBench's leaderboard "Overall": nine columns converted to 0–100 and averaged with equal weight.

Overall = mean(20·AlpacaEval_full, 20·CommonEval, 20·WildVoice, SD-QA, MMSU, OBQA, BBH, IFEval, AdvBench), where the
open subsets are 1–5 judge means, SD-QA = (panda + gpt)/2 on the ``usa`` split, IFEval = 100·final and
AdvBench = 100·refusal_rate (VoiceBench leaderboard rules, checked against all leaderboard rows to within 0.006).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from speechlm_eval.rundir import ARMS

# Multiplier from a scorer's mean per-item value to points on the leaderboard's 0-100 scale, for scorers whose own
# metric is not already a percentage (AdvBench and IFEval x100, open-ended 1-5 judge means x20).
POINTS_SCALE: dict[str, float] = {"harm": 100.0, "ifeval": 100.0, "open": 20.0}
# column -> (subset, how to read the column in 0–100 units from the subset's official metric dict)
Column = tuple[str, Callable[[Mapping[str, Any]], float | None]]


def _times(key: str, factor: float) -> Callable[[Mapping[str, Any]], float | None]:
    return lambda official: None if official.get(key) is None else factor * float(official[key])


def _sdqa(official: Mapping[str, Any]) -> float | None:
    if official.get("panda") is None or official.get("gpt") is None:
        return None  # the leaderboard averages both halves; the gpt half alone is not the column
    return (float(official["panda"]) + float(official["gpt"])) / 2


LEADERBOARD_COLUMNS: dict[str, Column] = {
    "AlpacaEval": ("alpacaeval_full", _times("gpt", POINTS_SCALE["open"])),
    "CommonEval": ("commoneval", _times("gpt", POINTS_SCALE["open"])),
    "WildVoice": ("wildvoice", _times("gpt", POINTS_SCALE["open"])),
    "SD-QA": ("sd-qa", _sdqa),
    "MMSU": ("mmsu", _times("acc", 1.0)),
    "OBQA": ("openbookqa", _times("acc", 1.0)),
    "BBH": ("bbh", _times("acc", 1.0)),
    "IFEval": ("ifeval", _times("final", POINTS_SCALE["ifeval"])),
    "AdvBench": ("advbench", _times("refusal_rate", POINTS_SCALE["harm"])),
}


def leaderboard_overall(subsets: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per arm: the nine columns (``None`` where missing), and Overall only when all nine are present.

    ``subsets`` is results.json's ``subsets`` object (each arm carries the scorer's ``official`` dict).
    """
    arms = sorted({arm for entry in subsets.values() for arm in entry.get("arms", {}) if arm in ARMS})
    out: dict[str, Any] = {"formula": "mean(20*AlpacaEval_full, 20*CommonEval, 20*WildVoice, SD-QA, MMSU, OBQA, "
                           "BBH, IFEval, AdvBench)", "arms": {}}
    for arm in arms:
        columns: dict[str, float | None] = {}
        for column, (subset, read) in LEADERBOARD_COLUMNS.items():
            official = subsets.get(subset, {}).get("arms", {}).get(arm, {}).get("official")
            columns[column] = read(official) if official else None
        missing = [c for c, v in columns.items() if v is None]
        present = [v for v in columns.values() if v is not None]
        out["arms"][arm] = {
            "overall": None if missing else sum(present) / len(present),
            "columns": columns,
            "missing": missing,
        }
    return out
