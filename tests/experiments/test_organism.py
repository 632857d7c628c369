"""The committed organism experiment report is exactly what its JSON renders to (nothing edited by hand)."""

from __future__ import annotations

import json
from pathlib import Path

from speechlm_eval.experiments.organism import ALL_ARMS, distill_steps, render_experiments

REPORT = Path(__file__).resolve().parents[2] / "reports" / "organism" / "experiments"


def test_committed_table_is_rendered_from_its_json() -> None:
    summary = json.loads((REPORT / "experiments.json").read_text())
    assert (REPORT / "experiments.md").read_text() == render_experiments(summary)
    rows = summary["rows"]
    assert {r["seed"] for r in rows} == {0, 1, 2}
    assert {r["arm"] for r in rows} == {"before", *ALL_ARMS}
    for r in rows:
        for gap in ("forgetting", "inequivalence"):
            assert r[gap]["ci_low"] <= r[gap]["value"] <= r[gap]["ci_high"]


def test_control_steps_match_the_distillation_steps() -> None:
    assert distill_steps(288, 24, 24) == 288
    assert distill_steps(289, 24, 2) == 26
