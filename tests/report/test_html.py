"""report.html: the table matches report.md, gaps are colour-coded, plots embed as PNG, nothing remote, all escaped,
byte-identical output, and partial results (missing arms, gaps, subsets) still render."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from speechlm_eval.report.build import RESULTS_SCHEMA, build_results
from speechlm_eval.report.html import render_html, write_html
from speechlm_eval.report.markdown import render_markdown

HOSTILE_ID = "<script>alert(1)</script>"
HOSTILE_SUBSET = '"><img src=x onerror=alert(2)>'
HOSTILE_NOTE = "note with <b>markup</b> & an https://example.com/x.js link"
ROOT = Path(__file__).resolve().parents[2]


def _arm(score: float | None, low: float | None, high: float | None, n: int = 8, errors: int = 0) -> dict[str, Any]:
    return {"score": score, "ci_low": low, "ci_high": high, "n": n, "errors": errors, "missing": 0,
            "unparsed": 1, "official": None if score is None else {"acc": score}}


def _gap(value: float, low: float, high: float, p: float, n: int = 8) -> dict[str, Any]:
    return {"value": value, "ci_low": low, "ci_high": high, "p_value": p, "test": "mcnemar-exact", "n": n,
            "relative": None, "n_resamples": 1000, "seed": 0, "confidence": 0.95, "empty": False}


def _subset(metric: str, arms: dict[str, dict[str, Any]], speech_only: bool = False,
            **gaps: dict[str, Any]) -> dict[str, Any]:
    return {"n": 8, "scorer": "x", "metric": metric, "speech_only": speech_only, "arms": arms, **gaps}


def make_results(perception: bool = True) -> dict[str, Any]:
    """A results/v1 object covering every case the renderer branches on."""
    results: dict[str, Any] = {
        "schema": RESULTS_SCHEMA,
        "subsets": {
            "openbookqa": _subset(
                "acc",
                {"text_llm_text": _arm(62.5, 37.5, 87.5), "speech_llm_text": _arm(50.0, 25.0, 75.0),
                 "speech_llm_speech": _arm(25.0, 0.0, 75.0)},
                forgetting=_gap(12.5, 2.5, 22.5, 0.01), inequivalence=_gap(25.0, -12.5, 62.5, 0.3)),
            "advbench": _subset(
                "refusal_rate",
                {"text_llm_text": _arm(1.0, 1.0, 1.0), "speech_llm_text": _arm(0.75, 0.5, 1.0, errors=2),
                 "speech_llm_speech": _arm(0.0, 0.0, 0.0)},
                forgetting=_gap(0.25, 0.0, 0.5, 0.5), inequivalence=_gap(0.75, 0.5, 1.0, 0.004)),
            "commoneval": _subset(
                "gpt",
                {"text_llm_text": _arm(3.1, 2.8, 3.4), "speech_llm_text": _arm(4.2, 3.9, 4.5),
                 "speech_llm_speech": _arm(3.0, 2.6, 3.3)},
                forgetting=_gap(-1.1, -1.5, -0.7, 0.001), inequivalence=_gap(1.2, 0.8, 1.6, 0.02)),
            "mmau": _subset("total_accuracy", {"speech_llm_speech": _arm(37.5, 12.5, 62.5)}, speech_only=True),
            # No gaps, one arm without scored items, one arm absent.
            HOSTILE_SUBSET: _subset("acc", {"text_llm_text": _arm(None, None, None, n=0, errors=8),
                                            "speech_llm_speech": _arm(12.5, 0.0, 37.5)}),
            "empty_arms": _subset("acc", {}),
        },
        "unscored": {"sd-qa": {"n": 3, "scorer": "qa", "reason": "scorer 'qa' is not available in this version"}},
        "manifest": {
            "models": {
                "speech_llm": {"id": HOSTILE_ID, "family": "qwen2-audio", "dtype": "bfloat16", "commit": "abc123"},
                "text_llm": {"id": "org/text-model", "family": "hf-causal", "dtype": "bfloat16", "revision": "main"},
            },
            "generation": {"do_sample": False, "max_new_tokens": 24},
            "seed": 0,
            "tts": {"engine": "espeak-ng", "engine_version": "1.51", "voice": "en-us", "rate": 160},
            "items": {"n": 43, "sha256": "86a2103622072886b502bf69202f8ed10a267a7b0e7ed296a182eef25f7ea0ca"},
            "statistics": {"confidence": 0.95, "n_resamples": 1000},
            "notes": [HOSTILE_NOTE],
            "packages": {"numpy": "2.4.6", "<evil>": "1.0"},
        },
    }
    if perception:
        results["diagnostics"] = {"perception": {
            "buckets": ["0", "(0, 0.2]", "> 0.2"],
            "inequivalence": {"openbookqa": [_gap(5.0, -5.0, 15.0, 0.4), _gap(20.0, 5.0, 35.0, 0.02), None],
                              "advbench": [_gap(0.1, 0.0, 0.2, 0.3), _gap(0.4, 0.1, 0.7, 0.03),
                                           _gap(0.9, 0.7, 1.0, 0.001)]},
        }}
    return results


class _Page(HTMLParser):
    """Collects tags with attributes, and the text of every table cell with its class."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.cells: list[tuple[str, str]] = []
        self._cell: list[str] | None = None
        self._cell_class = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag == "td":
            self._cell, self._cell_class = [], dict(attrs).get("class") or ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.cells.append(("".join(self._cell), self._cell_class))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def markdown_rows(results: dict[str, Any]) -> list[list[str]]:
    """The data rows of report.md's gap table, as cell texts."""
    text = render_markdown(results)
    table = text[text.index("| subset |"):].split("\n\n")[0]  # the first table: scores and gaps
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def images(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    return make_results()


@pytest.fixture(scope="module")
def page(results: dict[str, Any]) -> str:
    return render_html(results)


def test_table_has_every_subset_with_cells_formatted_as_in_markdown(results: dict[str, Any], page: str) -> None:
    cells = parse(page).cells
    texts = [text for text, _ in cells]
    rows = markdown_rows(results)
    assert len(rows) == len(results["subsets"])
    for row in rows:
        # The subset name is the first cell of a row; every other cell follows in the same order as in report.md.
        start = texts.index(row[0])
        assert texts[start:start + len(row)] == row
    assert "62.50 [37.50, 87.50]" in texts
    assert "0.75 [0.50, 1.00] (2 err)" in texts
    assert "+12.50 [2.50, 22.50] p=0.010" in texts


def test_gap_cells_are_coloured_by_sign_and_significance(page: str) -> None:
    by_text = dict(parse(page).cells)
    assert by_text["+12.50 [2.50, 22.50] p=0.010"] == "gap-pos"
    assert by_text["+25.00 [-12.50, 62.50] p=0.300"] == "gap-ns"
    assert by_text["-1.10 [-1.50, -0.70] p=0.001"] == "gap-neg"
    assert by_text["+0.75 [0.50, 1.00] p=0.004"] == "gap-pos"
    # mmau (speech-only) has no gaps: its gap cells say so rather than being coloured.
    assert [cls for text, cls in parse(page).cells if text == "–" and cls.startswith("gap")] == ["gap-none"] * 6


def test_header_notes_and_packages(results: dict[str, Any], page: str) -> None:
    assert "org/text-model" in page and "revision abc123" in page and "revision main" in page
    assert "86a2103622072886" in page and "86a2103622072886b" not in page
    for subset in ("mmau", "sd-qa"):
        assert re.search(rf"<li>[^<]*{subset}", page)
    assert "seeded draw" in page and "<code>unparsed</code>" in page
    assert "numpy 2.4.6" in page


def test_plots_are_embedded_pngs_one_per_figure(results: dict[str, Any], page: str) -> None:
    pngs = images(page)
    assert len(pngs) == 3  # arm scores, gaps, WER split
    for png in pngs:
        image = Image.open(io.BytesIO(png))
        image.load()
        assert image.format == "PNG" and image.width > 300 and image.height > 150
        assert "Software" not in image.info  # metadata stripped: nothing version-dependent in the bytes
    assert len(images(render_html(make_results(perception=False)))) == 2


def test_malformed_perception_diagnostic_is_skipped() -> None:
    results = make_results()
    results["diagnostics"]["perception"] = {"buckets": ["low", "high"], "inequivalence": {"openbookqa": [None]}}
    assert len(images(render_html(results))) == 2


def test_no_remote_resources_and_no_scripts(page: str) -> None:
    parsed = parse(page)
    for tag, attrs in parsed.tags:
        assert tag not in {"script", "link", "iframe", "object", "embed"}
        for name, value in attrs.items():
            assert not name.startswith("on")
            if name in {"src", "href"}:
                assert value is not None and value.startswith("data:image/png;base64,")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "@import" not in page and "url(" not in page


def test_strings_from_results_are_escaped(page: str) -> None:
    assert HOSTILE_ID not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert HOSTILE_SUBSET not in page and "onerror=alert(2)&gt;" in page
    assert "<b>markup</b>" not in page and "&lt;b&gt;markup&lt;/b&gt; &amp; an" in page
    assert "<evil>" not in page
    # The hostile subset name still appears, as text, as a table cell and as a note-free row.
    assert HOSTILE_SUBSET in [text for text, _ in parse(page).cells]


def test_same_results_give_identical_bytes(results: dict[str, Any], page: str, tmp_path: Path) -> None:
    assert render_html(copy.deepcopy(results)) == page
    # A fresh interpreter with another hash seed (dict/set order, font caches) must agree too.
    (tmp_path / "results.json").write_text(json.dumps(results))
    script = ("import json, pathlib, sys; from speechlm_eval.report.html import write_html; "
              "run = pathlib.Path(sys.argv[1]); write_html(run, json.loads((run / 'results.json').read_text()))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "MPLBACKEND": "svg"}
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, cwd=ROOT, env=env)
    assert (tmp_path / "report.html").read_text(encoding="utf-8") == page


def test_partial_results_render(page: str) -> None:
    cells = parse(page).cells
    row = [text for text, _ in cells[[t for t, _ in cells].index("empty_arms"):][:8]]
    assert row == ["empty_arms", "8", "acc", "–", "–", "–", "–", "–"]
    bare = render_html({"schema": RESULTS_SCHEMA, "subsets": {}, "unscored": {}, "manifest": {}})
    assert "No scored subsets to plot" in bare and images(bare) == []


def _write_run(run_dir: Path) -> None:
    """A two-subset run directory (mcq text+speech, mmau speech-only) with hand-written responses."""
    rows, records = [], {"text_llm_text": [], "speech_llm_text": [], "speech_llm_speech": []}
    answers = {"text_llm_text": "AAAAAB", "speech_llm_text": "AABBBB", "speech_llm_speech": "ABBBCC"}
    for i in range(6):
        rows.append({"id": f"obqa/{i}", "subset": "openbookqa", "text": "q", "audio_instruction": None,
                     "choices": [], "reference": "A", "meta": {}, "scorer": "mcq"})
        for arm, letters in answers.items():
            records[arm].append({"id": f"obqa/{i}", "arm": arm, "response": letters[i], "error": None})
    for i in range(3):
        rows.append({"id": f"mmau/{i}", "subset": "mmau", "text": None, "audio_instruction": "which?",
                     "choices": ["dog", "cat"], "reference": "dog", "meta": {"task": "sound", "difficulty": "easy"},
                     "scorer": "mmau"})
        records["speech_llm_speech"].append({"id": f"mmau/{i}", "arm": "speech_llm_speech",
                                             "response": "dog" if i else "cat", "error": None})
    (run_dir / "records").mkdir(parents=True)
    (run_dir / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for arm, recs in records.items():
        (run_dir / "records" / f"{arm}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    manifest = {"seed": 0, "statistics": {"n_resamples": 200}, "items": {"n": len(rows), "sha256": "0" * 64}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))


def test_renders_results_built_from_a_run_directory(tmp_path: Path) -> None:
    _write_run(tmp_path)
    results = build_results(tmp_path)
    path = write_html(tmp_path, results)
    assert path == tmp_path / "report.html"
    page = path.read_text(encoding="utf-8")
    assert page == render_html(results)
    texts = [text for text, _ in parse(page).cells]
    for row in markdown_rows(results):
        start = texts.index(row[0])
        assert texts[start:start + len(row)] == row
    assert len(images(page)) == 2


def test_dollar_signs_in_names_are_drawn_as_text_not_mathtext() -> None:
    results = make_results(perception=False)
    results["subsets"][r"$\frac{x$"] = results["subsets"].pop("openbookqa")
    results["subsets"][r"$\frac{x$"]["metric"] = r"$\undefined$"
    page = render_html(results)  # unescaped, matplotlib's mathtext parser would raise on these names
    assert r"$\frac{x$" in [text for text, _ in parse(page).cells]
    assert len(images(page)) == 2


def explorer_items(page: str) -> dict[str, set[str]]:
    """``{item id: its classes}`` of the explorer's list items."""
    return {attrs["data-id"]: set((attrs.get("class") or "").split()) for tag, attrs in parse(page).tags
            if tag == "li" and "data-id" in attrs}


def test_scores_file_and_item_explorer_list_the_flips(tmp_path: Path) -> None:
    from speechlm_eval.report.build import build_report
    from speechlm_eval.rundir import RunDir

    _write_run(tmp_path)
    # Responses of the text LLM, speech LLM typed, speech LLM spoken (reference "A"): item 1 is right typed, wrong
    # spoken; items 2-4 are right for the text LLM and wrong for the speech LLM.
    build_report(tmp_path)
    rows = {r["id"]: r for r in RunDir(tmp_path).scores()}
    assert len(rows) == 9 and rows["obqa/1"]["arms"]["speech_llm_speech"] == {
        "response": "B", "error": None, "score": 0.0, "parsed": True, "extracted": "B"}
    assert {i for i, r in rows.items() if (r["gaps"]["inequivalence"] or 0) > 0} == {"obqa/1"}
    assert {i for i, r in rows.items() if (r["gaps"]["forgetting"] or 0) > 0} == {"obqa/2", "obqa/3", "obqa/4"}
    assert rows["mmau/0"]["gaps"] == {"forgetting": None, "inequivalence": None}
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    items = explorer_items(page)
    assert set(items) == set(rows)
    assert {i for i, c in items.items() if "ineq" in c} == {"obqa/1"}
    assert {i for i, c in items.items() if "forget" in c} == {"obqa/2", "obqa/3", "obqa/4"}
    # The filters are radio buttons and CSS, so the page still runs no script under its CSP.
    assert "#flt-ineq:checked~ol.items>li:not(.ineq)" in page and "#flt-forget:checked~ol.items>li:not(.forget)" in page
    assert "right typed, wrong spoken (1)" in page and "<script" not in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page


def test_explorer_escapes_responses() -> None:
    from speechlm_eval.report.html import explorer_html

    row = {"id": HOSTILE_ID, "subset": "s", "text": HOSTILE_NOTE, "reference": "A", "gaps": {"inequivalence": 1.0},
           "arms": {"speech_llm_speech": {"response": HOSTILE_SUBSET, "score": 0.0, "parsed": True,
                                          "extracted": None, "error": None}}}
    page = explorer_html([row])
    assert HOSTILE_ID not in page and HOSTILE_SUBSET not in page and "<b>markup</b>" not in page
    assert explorer_items(page) == {HOSTILE_ID: {"item", "ineq"}}
