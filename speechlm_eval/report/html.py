"""``report.html``: the gap report as one self-contained page (inline CSS, plots as base64 PNG, no external requests).

Every string taken from a results object is HTML-escaped (model ids, subset names and notes are user-controlled), and
a Content-Security-Policy forbids scripts and remote loads as a second line of defence. The same results give the
same bytes: nothing time- or host-dependent is written and the plots are rendered deterministically.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any, Iterable

import matplotlib

from speechlm_eval.records import write_text_atomic
from speechlm_eval.report.frontend import FRONT_END_HEADLINE, FRONT_END_TITLE
from speechlm_eval.report.markdown import (
    GAPS_NOTE,
    PROXY_NOTE,
    diagnostics_lines,
    fmt,
    fmt_gap,
    overall_lines,
    parity_lines,
    report_notes,
    usage_lines,
)
from speechlm_eval.report.plots import report_figures, significant
from speechlm_eval.rundir import ARM_TITLES, ARMS
# No scripts, no remote anything: images only from data: URIs, styles only from the inline <style>.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;margin:2rem auto;
max-width:1280px;padding:0 1rem;color:#1d1d1f;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.3rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.88em;background:#f3f3f5;
padding:0 .25em;border-radius:3px;word-break:break-all}
dl.meta{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem;margin:0}dl.meta dt{font-weight:600}
dl.meta dd{margin:0}
table{border-collapse:collapse;font-size:.86rem;margin:.5rem 0}
th,td{border:1px solid #d6d6d9;padding:.3rem .5rem;text-align:right;white-space:nowrap}
th{background:#f3f3f5}td.name,th.name{text-align:left}td.subset{white-space:normal;overflow-wrap:break-word;
max-width:14rem}div.scroll{overflow-x:auto}
td.gap-pos{background:#f8d2cc;color:#7a1709}td.gap-neg{background:#d3e4f5;color:#0b3c6b}
td.gap-ns{background:#eeeeee;color:#555}td[class^="gap-"]{white-space:normal}span.nw{white-space:nowrap}
td.gap-none,td.empty{color:#999;text-align:center}
.legend{font-size:.8rem;color:#555}
.legend span{display:inline-block;padding:.05rem .45rem;margin-right:.5rem;border-radius:3px;font-size:.8rem}
.legend .gap-pos{background:#f8d2cc;color:#7a1709}.legend .gap-neg{background:#d3e4f5;color:#0b3c6b}
.legend .gap-ns{background:#eee;color:#555}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.85rem;color:#555}
p.small,footer{font-size:.8rem;color:#666}ul.notes li{margin-bottom:.3rem}
table.extra td{white-space:normal}table.extra td:first-child{text-align:left}
td.gap-frontend{background:#3b0a0a;color:#fff;font-weight:600}
div.alert{border:2px solid #a0180b;background:#fdecea;padding:.6rem 1rem;border-radius:4px;margin:1rem 0}
div.alert h2{margin-top:.2rem;border:0;color:#a0180b}
.explorer input[type=radio]{position:absolute;opacity:0}
.explorer label{display:inline-block;margin:.15rem .3rem .15rem 0;padding:.2rem .6rem;border:1px solid #bbb;
border-radius:1rem;font-size:.85rem;cursor:pointer}
.explorer input:checked+label{background:#1d1d1f;color:#fff;border-color:#1d1d1f}
.explorer input:focus-visible+label{outline:2px solid #0072B2}
#flt-ineq:checked~ol.items>li:not(.ineq),#flt-forget:checked~ol.items>li:not(.forget){display:none}
ol.items{list-style:none;padding:0;margin:.6rem 0}ol.items>li{border-top:1px solid #e3e3e6;padding:.25rem 0}
ol.items summary{cursor:pointer;overflow-wrap:anywhere}
ol.items .q{white-space:pre-wrap;overflow-wrap:anywhere;margin:.3rem 0}
.sc{display:inline-block;min-width:1.6rem;padding:0 .3rem;margin-left:.25rem;border-radius:3px;font-size:.8rem;
text-align:center;background:#eee;color:#333}.sc.ok{background:#d3ecd9;color:#0b4a1d}.sc.bad{background:#f8d2cc;
color:#7a1709}dl.arms{display:grid;grid-template-columns:minmax(7rem,max-content) 1fr;gap:.15rem .8rem;margin:.3rem 0}
dl.arms dt{font-weight:600}dl.arms dd{margin:0;overflow-wrap:anywhere;white-space:pre-wrap}
@media (max-width:480px){body{margin:1rem auto;padding:0 .5rem}dl.arms{grid-template-columns:1fr}
th,td{padding:.25rem .3rem}}
@media (max-width:640px){table.stack thead{display:none}table.stack,table.stack tbody,table.stack tr{display:block}
table.stack tr{border:1px solid #d6d6d9;margin:.5rem 0}table.stack td{display:flex;justify-content:space-between;
gap:.8rem;border:0;border-top:1px solid #eee;white-space:normal;text-align:right;max-width:none}
table.stack td::before{content:attr(data-label);font-weight:600;text-align:left;color:#333}
table.stack td.name{text-align:right}}
tr.worse td{font-weight:600}td.chg-worse{background:#f8d2cc;color:#7a1709}td.chg-better{background:#d3e4f5;
color:#0b3c6b}td.chg-ns{background:#eeeeee;color:#555}
"""
MAX_EXPLORER_ITEMS = 2000  # beyond this many, only the flipped items are listed (scores.jsonl has them all)
ARM_SHORT = {"text_llm_text": "TT", "speech_llm_text": "ST", "speech_llm_speech": "SS"}


def esc(value: Any) -> str:
    """``str(value)`` escaped for HTML text and attribute values."""
    return html.escape(str(value), quote=True)


def note_html(note: str) -> str:
    """A plain-text note escaped, with its `backtick` spans shown as code (as report.md renders them)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(note))


def arm_cell(arm: dict[str, Any] | None) -> tuple[str, str]:
    """``(text, tooltip)`` of an arm score cell, text formatted as in ``report.md``."""
    if arm is None or arm.get("score") is None:
        return "–", "not run" if arm is None else "no scored items"
    extra = f" ({arm['errors']} err)" if arm.get("errors") else ""
    text = f"{arm['score']:.2f} [{fmt(arm.get('ci_low'))}, {fmt(arm.get('ci_high'))}]{extra}"
    tip = (f"n={arm.get('n')}, errors={arm.get('errors', 0)}, missing={arm.get('missing', 0)}, "
           f"unparsed={arm.get('unparsed', 0)}")
    return text, tip


def gap_class(gap: dict[str, Any] | None) -> str:
    """CSS class: significant positive (the speech side is worse), significant negative, n.s., no gap, or a gap that
    measures a broken front end (the audio was not heard)."""
    if not gap or gap.get("value") is None:
        return "gap-none"
    if gap.get("front_end_failure"):
        return "gap-frontend"
    if not significant(gap):
        return "gap-ns"
    return "gap-pos" if gap["value"] > 0 else "gap-neg"


def gap_cell(gap: dict[str, Any] | None) -> str:
    """A coloured gap cell, text as in ``report.md``, with the test, n and relative gap as its tooltip."""
    tip = ""
    if gap and gap.get("value") is not None:
        relative = gap.get("relative")
        rel = "" if relative is None else f", relative {relative:+.1%}"
        summary = f"{gap.get('test')}, n={gap.get('n')}{rel}"
        tip = f' title="{esc(summary)}"'
    # Value and CI stay on one line; the p-value may wrap below them when the table is tight.
    value_ci, sep, p_value = fmt_gap(gap).partition(" p=")
    parts = [value_ci, f"p={p_value}"] if sep else [value_ci]
    text = " ".join(f'<span class="nw">{esc(part)}</span>' for part in parts)
    return f'<td class="{gap_class(gap)}"{tip}>{text}</td>'


def _model_line(model: dict[str, Any]) -> str:
    if model.get("family") == "served":
        return (f"<code>{esc(model.get('id'))}</code> (served at {esc(model.get('base_url'))}, "
                f"{esc(model.get('api'))}, concurrency {esc(model.get('concurrency'))})")
    revision = model.get("commit") or model.get("revision") or "local"
    return (f"<code>{esc(model.get('id'))}</code> ({esc(model.get('family'))}, {esc(model.get('dtype'))}, "
            f"revision {esc(revision)})")


def header_html(manifest: dict[str, Any]) -> str:
    """The run description: models, decoding, TTS, items and statistics settings."""
    rows: list[tuple[str, str]] = []
    models = manifest.get("models", {})
    for role, title in (("speech_llm", "Speech LLM"), ("text_llm", "Text LLM")):
        if role in models:
            rows.append((title, _model_line(models[role])))
    reference = manifest.get("text_llm_reference")
    if reference:
        rows.append(("Text LLM is the speech LLM's", f"<strong>{esc(reference['label'])}</strong>: "
                     f"{esc(reference['reason'])}"))
    system = manifest.get("system_prompt")
    if system:
        text = "none" if system.get("text") is None else f"<code>{esc(system['text'])}</code>"
        rows.append(("System prompt (both models)", f"{text} ({esc(system.get('policy'))})"))
    gen = manifest.get("generation", {})
    extra = "".join(f", {esc(k)}={esc(v)}" for k, v in sorted(gen.get("extra", {}).items()))
    decoding = (f"{'sampling' if gen.get('do_sample') else 'greedy'}, max_new_tokens={esc(gen.get('max_new_tokens'))}"
                f"{extra}, seed {esc(manifest.get('seed'))}")
    if gen.get("do_sample"):
        decoding += f", temperature {esc(gen.get('temperature'))}, top_p {esc(gen.get('top_p'))}"
    rows.append(("Decoding", decoding))
    tts = manifest.get("tts", {})
    rows.append(("TTS (items without audio)", f"{esc(tts.get('engine'))} {esc(tts.get('engine_version', ''))} "
                 f"voice {esc(tts.get('voice'))} rate {esc(tts.get('rate'))}"))
    items = manifest.get("items", {})
    rows.append(("Items", f"{esc(items.get('n'))} (sha256 <code>{esc(str(items.get('sha256', ''))[:16])}</code>)"))
    stats = manifest.get("statistics", {})
    if stats:
        rows.append(("Statistics", f"confidence {esc(stats.get('confidence'))}, "
                     f"{esc(stats.get('n_resamples'))} bootstrap resamples"))
    return '<dl class="meta">' + "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


def table_html(subsets: dict[str, dict[str, Any]], proxy: bool = False) -> str:
    """The gap table of ``report.md``, with gap cells coloured by sign and significance."""
    head = ('<tr><th class="name">subset</th><th>n</th><th class="name">metric</th>'
            + "".join(f"<th>{esc(ARM_TITLES[a])}</th>" for a in ARMS)
            + f"<th>{'forgetting vs proxy' if proxy else 'forgetting'}</th><th>inequivalence</th></tr>")
    forgetting = "forgetting vs proxy" if proxy else "forgetting"  # the column's name, beside each stacked value
    labels = ["subset", "n", "metric", *(ARM_TITLES[a] for a in ARMS), forgetting, "inequivalence"]
    rows = []
    for subset, entry in subsets.items():
        cells = [f'<td class="name subset">{esc(subset)}</td><td>{esc(entry.get("n"))}</td>'
                 f'<td class="name">{esc(entry.get("metric"))}</td>']
        for arm in ARMS:
            text, tip = arm_cell(entry.get("arms", {}).get(arm))
            css = ' class="empty"' if text == "–" else ""
            cells.append(f'<td{css} title="{esc(tip)}">{esc(text)}</td>')
        cells += [gap_cell(entry.get("forgetting")), gap_cell(entry.get("inequivalence"))]
        rows.append("<tr>" + labelled("".join(cells), labels) + "</tr>")
    return (f'<div class="scroll"><table class="stack"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
            "</div>")


def labelled(cells: str, labels: list[str]) -> str:
    """Each ``<td`` of a row given its column's name as ``data-label``: on a narrow screen the table stacks into one
    card per row and shows the name beside each value (so the gap columns are never off-screen)."""
    parts = cells.split("<td")
    return parts[0] + "".join(f'<td data-label="{esc(label)}"{rest}' for label, rest in zip(labels, parts[1:]))


def legend_html(confidence: Any) -> str:
    alpha = 1.0 - (confidence if isinstance(confidence, (int, float)) else 0.95)
    return ('<p class="legend"><span class="gap-pos">significant, positive (speech side worse)</span>'
            '<span class="gap-neg">significant, negative</span><span class="gap-ns">not significant</span>'
            f"significant: paired-test p below 1 − confidence ({alpha:.2g}). Hover a cell for n, errors, unparsed "
            "and the test.</p>")


def figures_html(figures: Iterable[tuple[str, bytes]]) -> str:
    parts = []
    for caption, png in figures:
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<figure><img alt="{esc(caption)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{esc(caption)}</figcaption></figure>")
    return "".join(parts)


def packages_html(manifest: dict[str, Any]) -> str:
    packages = manifest.get("packages", {})
    listed = ", ".join(f"{esc(name)} {esc(version)}" for name, version in sorted(packages.items()))
    return (f"<footer><h2>Package versions</h2><p>{listed or 'not recorded'}</p>"
            f"<p>Plots rendered with matplotlib {esc(matplotlib.__version__)}.</p></footer>")


def markdown_sections_html(lines: list[str]) -> str:
    """The report.md sections that are headings, prose and pipe tables (Overall, diagnostics) as escaped HTML."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if table:
            head, *rows = table
            out.append('<table class="extra"><tr>' + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>"
                       + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
                       + "</table>")
            table.clear()

    for line in lines:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):  # skip the |---| separator
                table.append(cells)
            continue
        flush()
        if line.startswith("## "):
            out.append(f"<h2>{esc(line[3:])}</h2>")
        elif line.startswith("- "):
            out.append(f"<p>{esc(line[2:]).replace('**', '')}</p>")
        elif line.strip():
            out.append(f'<p class="small">{esc(line.strip("`"))}</p>')
    flush()
    return "\n".join(out)


def front_end_html(results: dict[str, Any]) -> str:
    """The alert a page opens with when a subset's audio was not heard ("" when every front end works)."""
    failed = {s: e for s, e in (results.get("front_end") or {}).items() if e.get("failure")}
    if not failed:
        return ""
    items = "".join(f"<li><b>{esc(subset)}</b>: {esc('; '.join(e['reasons']))}</li>" for subset, e in failed.items())
    return (f'<div class="alert" role="alert"><h2>{esc(FRONT_END_TITLE)}</h2>'
            f"<p>{esc(FRONT_END_HEADLINE.format(subsets=', '.join(failed)))}</p><ul>{items}</ul></div>")


def _flips(row: dict[str, Any]) -> list[str]:
    """The explorer filters an item belongs to: ``ineq`` (better typed than spoken), ``forget`` (better from the text
    LLM than from the speech LLM, both typed)."""
    gaps = row.get("gaps") or {}
    return [css for gap, css in (("inequivalence", "ineq"), ("forgetting", "forget"))
            if isinstance(gaps.get(gap), (int, float)) and gaps[gap] > 0]


def _score_badge(arm: str, entry: dict[str, Any] | None) -> str:
    if entry is None:
        return ""
    score = entry.get("score")
    if entry.get("error"):
        text, css = "err", "bad"
    elif score is None:
        text, css = "–", ""
    else:
        text, css = f"{score:g}", {1.0: "ok", 0.0: "bad"}.get(float(score), "")
    return f'<span class="sc {css}" title="{esc(ARM_TITLES[arm])}">{esc(ARM_SHORT[arm])} {esc(text)}</span>'


def _arm_detail(arm: str, entry: dict[str, Any]) -> str:
    if entry.get("error"):
        body = f"error: {entry['error']}"
    else:
        parsed = "" if entry.get("parsed") is not False else ", unparsed (seeded draw)"
        body = (f"{entry.get('response')}\n— score {entry.get('score')}, extracted {entry.get('extracted')!r}"
                f"{parsed}")
    return f"<dt>{esc(ARM_TITLES[arm])}</dt><dd>{esc(body)}</dd>"


def _item_html(row: dict[str, Any]) -> str:
    flips = _flips(row)
    arms = row.get("arms") or {}
    badges = "".join(_score_badge(arm, arms.get(arm)) for arm in ARMS)
    question = row.get("text") if row.get("text") is not None else row.get("audio_instruction")
    details = "".join(_arm_detail(arm, arms[arm]) for arm in ARMS if arm in arms)
    return (f'<li class="{" ".join(["item", *flips])}" data-id="{esc(row["id"])}"><details><summary><code>'
            f'{esc(row["id"])}</code>{badges}</summary><p class="q">{esc(question)}</p>'
            f'<p class="small">reference: <code>{esc(row.get("reference"))}</code></p>'
            f'<dl class="arms">{details}</dl></details></li>')


def explorer_html(rows: list[dict[str, Any]] | None) -> str:
    """The item explorer: every item with its typed and spoken responses and scores, filterable (radio buttons and
    CSS only: the page runs no script) to the items answered right typed but wrong spoken, and to the forgetting
    flips. A list rather than a wide table, so it reads on a phone."""
    if not rows:
        return ""
    n_ineq = sum("ineq" in _flips(r) for r in rows)
    n_forget = sum("forget" in _flips(r) for r in rows)
    shown = rows if len(rows) <= MAX_EXPLORER_ITEMS else [r for r in rows if _flips(r)]
    capped = ("" if shown is rows else f'<p class="small">{len(rows)} items: only the {len(shown)} flipped ones are '
              "listed here; <code>scores.jsonl</code> has every item.</p>")
    return ("<h2>Items</h2>"
            '<p class="small">Each item with its responses and per-arm scores (TT text LLM · text, ST speech LLM · '
            "text, SS speech LLM · speech); open an item for the question, reference and responses. Every item is in "
            "<code>scores.jsonl</code>.</p>" + capped
            + '<div class="explorer">'
            f'<input type="radio" name="flt" id="flt-all" checked><label for="flt-all">all ({len(rows)})</label>'
            f'<input type="radio" name="flt" id="flt-ineq"><label for="flt-ineq">right typed, wrong spoken '
            f"({n_ineq})</label>"
            f'<input type="radio" name="flt" id="flt-forget"><label for="flt-forget">forgetting flips: text LLM '
            f"right, speech LLM wrong ({n_forget})</label>"
            '<ol class="items">' + "".join(_item_html(r) for r in shown) + "</ol></div>")


def render_html(results: dict[str, Any], figures: list[tuple[str, bytes]] | None = None,
                scores: list[dict[str, Any]] | None = None) -> str:
    """The whole ``report.html`` page for a results object (schema ``speechlm-eval/results/v1``); ``figures`` as
    :func:`report_figures` returns them (computed when not given); ``scores``: the ``scores.jsonl`` rows for the item
    explorer (none: no explorer)."""
    manifest = results.get("manifest", {})
    subsets = results.get("subsets", {})
    notes = "".join(f"<li>{note_html(n)}</li>" for n in report_notes(results))
    proxy = (manifest.get("text_llm_reference") or {}).get("label") == "proxy"
    body = [
        "<h1>speechlm-eval gap report</h1>",
        front_end_html(results),
        header_html(manifest),
        f'<p class="small">{esc(GAPS_NOTE)}</p>',
        *([f"<p><strong>{note_html(PROXY_NOTE.replace('**', ''))}</strong></p>"] if proxy else []),
        "<h2>Scores and gaps</h2>",
        table_html(subsets, proxy),
        legend_html(manifest.get("statistics", {}).get("confidence")),
        "<h2>Plots</h2>",
        figures_html(report_figures(results) if figures is None else figures) or "<p>No scored subsets to plot.</p>",
        markdown_sections_html(overall_lines(results.get("overall"))
                               + diagnostics_lines(results.get("diagnostics") or {})
                               + parity_lines(results.get("parity")) + usage_lines(results.get("usage"))),
        explorer_html(scores),
        f'<h2>Notes</h2><ul class="notes">{notes}</ul>',
        packages_html(manifest),
    ]
    return page_html("speechlm-eval gap report", body)


def page_html(title: str, body: Iterable[str]) -> str:
    """The page shell every report shares: one stylesheet, the CSP (no script, nothing remote), a phone viewport."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(part for part in body if part) + "\n</body></html>\n")


def inline_html(text: str) -> str:
    """One line of the reports' Markdown (``**bold**``, ```code```) as escaped HTML, so no raw Markdown shows."""
    out = esc(text)
    out = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def write_html(run_dir: Path, results: dict[str, Any], figures: list[tuple[str, bytes]] | None = None,
               scores: list[dict[str, Any]] | None = None) -> Path:
    """Write ``report.html`` into ``run_dir`` (atomically) and return its path."""
    path = Path(run_dir) / "report.html"
    write_text_atomic(path, render_html(results, figures, scores))
    return path
