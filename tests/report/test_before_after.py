"""The distill before/after page: the gap page's renderer (shell, colours, stacking tables, plots with CIs), a gap that
got worse shown first, no raw Markdown; and the WER chart never draws a tiny bucket as a bar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from speechlm_eval.report.before_after import write_before_after
from speechlm_eval.report.build import build_report
from speechlm_eval.report.plots import MIN_BUCKET_N, wer_split_figure
from tests.report.test_check import _responses, write_run
from tests.report.test_html import images, parse


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 items: distillation fixes 12 typed answers (forgetting shrinks) but none spoken (inequivalence grows)."""
    out = tmp_path_factory.mktemp("distill")
    before = {"text_llm_text": _responses(40, []), "speech_llm_text": _responses(40, range(12)),
              "speech_llm_speech": _responses(40, range(14))}
    after = {**before, "speech_llm_text": _responses(40, [])}
    for name, arms in (("before", before), ("after", after)):
        build_report(write_run(out / name, {"openbookqa": ("mcq", arms)}))
    write_before_after(out, out / "before", out / "after", ["- **Student** (before): `models/student`",
                                                            "- **Teacher** (text LLM): `models/teacher`"])
    return out


def test_the_gap_that_got_worse_comes_first(distilled: Path) -> None:
    markdown = (distilled / "report.md").read_text()
    assert markdown.index("## A gap got worse") < markdown.index("| subset | gap |")
    assert "inequivalence got worse on openbookqa: 5.00 → 35.00 (+30.00" in markdown and ", significant)" in markdown
    assert "forgetting got worse" not in markdown
    page = (distilled / "report.html").read_text()
    assert page.index('<div class="alert"') < page.index("<h2>Gaps</h2>")


def test_changes_are_coloured_by_direction_and_significance(distilled: Path) -> None:
    page = (distilled / "report.html").read_text()
    cells = parse(page).cells
    texts = [t for t, _ in cells]

    def change_class(row_start: str, quantity: str) -> str:
        index = next(i for i in range(len(texts) - 1) if texts[i] == row_start and texts[i + 1] == quantity)
        return cells[index + 5][1]

    assert change_class("openbookqa", "inequivalence") == "chg-worse"  # the gap grew, p < 0.05
    assert change_class("openbookqa", "forgetting") == "chg-better"  # the gap shrank, p < 0.05
    assert change_class("openbookqa", "text LLM · text") == "chg-ns"  # unchanged
    assert change_class("openbookqa", "speech LLM · text") == "chg-better"  # the score rose
    tags = parse(page).tags
    assert any(tag == "tr" and attrs.get("class") == "worse" for tag, attrs in tags)


def test_no_raw_markdown_and_plots_with_cis(distilled: Path) -> None:
    page = (distilled / "report.html").read_text()
    assert "`" not in page and "**" not in page
    assert "<code>models/student</code>" in page and "<b>Student</b>" in page
    assert len(images(page)) == 2  # gaps and arm scores, before vs after
    assert sorted(p.name for p in (distilled / "plots").glob("*.png")) == [
        "arm-scores-before-and-after-distillation.png", "gaps-before-and-after-distillation.png"]
    assert "![Gaps before and after distillation](plots/gaps-before-and-after-distillation.png)" in \
        (distilled / "report.md").read_text()


def test_tables_stack_on_a_narrow_screen(distilled: Path) -> None:
    """No browser here: the page must carry the stacking rule and label every cell of a stacking table (so the gap
    columns read as labelled lines at 390 px instead of sitting off-screen)."""
    for page in ((distilled / "report.html").read_text(), (distilled / "before" / "report.html").read_text()):
        assert "@media (max-width:640px){table.stack thead{display:none}" in page
        assert "table.stack td::before{content:attr(data-label)" in page
        tags = parse(page).tags
        in_stack, labelled, cells = False, 0, 0
        for tag, attrs in tags:
            if tag == "table":
                in_stack = "stack" in (attrs.get("class") or "")
            elif tag == "td" and in_stack:
                cells += 1
                labelled += bool(attrs.get("data-label"))
        assert cells and labelled == cells
    gap_page = (distilled / "before" / "report.html").read_text()
    labels = [attrs["data-label"] for tag, attrs in parse(gap_page).tags if tag == "td" and "data-label" in attrs]
    assert {"forgetting", "inequivalence"} <= set(labels)


def _bucket_gap(value: float, n: int) -> dict:
    return {"value": value, "ci_low": value - 5, "ci_high": value + 5, "p_value": 0.01, "n": n, "confidence": 0.95}


def test_wer_chart_does_not_draw_a_one_item_bucket() -> None:
    perception = {"buckets": ["heard", "partly", "misheard"],
                  "inequivalence": {"s": [_bucket_gap(10.0, 120), None, _bucket_gap(100.0, 1)]}}
    fig = wer_split_figure({"s": {"metric": "acc"}}, perception)
    (ax,) = fig.axes
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == [10.0]  # the 1-item bucket's +100 is not a bar
    texts = [t.get_text() for t in ax.texts]
    assert "n=120" in texts and "n=1\nnot drawn" in texts
    assert f"under {MIN_BUCKET_N} items not drawn" in fig._suptitle.get_text()
    only_tiny = {"buckets": ["heard"], "inequivalence": {"s": [_bucket_gap(100.0, 2)]}}
    assert wer_split_figure({"s": {"metric": "acc"}}, only_tiny) is None
    assert np.isfinite(heights).all()
