"""The before/after report of a distillation: forgetting and inequivalence of the same suite, paired per item.

``recovered = 1 − gap_after / gap_before`` per subset and gap (only where the gap before is positive); the change of
each gap has a paired bootstrap CI and a paired test over the items scored in every arm of both runs (the machinery of
``speechlm-eval check``, :func:`speechlm_eval.report.check.compare_runs`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from speechlm_eval.metrics.paired import recovered
from speechlm_eval.records import write_json_atomic, write_text_atomic
from speechlm_eval.report.check import compare_runs
from speechlm_eval.report.markdown import fmt
from speechlm_eval.rundir import ARM_TITLES, ARMS, DIAGNOSTICS, GAPS, RunDir, portable_path



def before_after(before: Path, after: Path, *, alpha: float = 0.05) -> dict[str, Any]:
    """The comparison object: per subset, each arm and gap before/after with the paired change."""
    report = compare_runs(before, after, max_drop=0.0, alpha=alpha, gate=False)
    subsets: dict[str, Any] = {}
    for c in report.comparisons:
        entry = subsets.setdefault(c.subset, {"arms": {}, "gaps": {}})
        row = {"n": c.n, "before": c.baseline, "after": c.candidate, "change": c.delta, "ci_low": c.ci_low,
               "ci_high": c.ci_high, "p_value": c.p_value, "test": c.test}
        if c.kind == "gap":
            row["recovered"] = recovered(c.baseline, c.candidate)
            entry["gaps"][c.quantity] = row
        else:
            entry["arms"][c.quantity] = row
    return {"schema": "speechlm-eval/before-after/v1", "before": str(before), "after": str(after), "alpha": alpha,
            "units": "points (0–100 scale; see speechlm-eval check --help)", "subsets": subsets,
            "distribution": distribution_changes(before, after), "notes": list(report.notes)}


def distribution_changes(before: Path, after: Path, seed: int = 0, n_resamples: int = 10_000) -> dict[str, Any]:
    """Per subset and divergence: mean per-token divergence before/after, paired by item (records/diagnostics.jsonl)."""
    import numpy as np

    from speechlm_eval.metrics.paired import paired_gap
    from speechlm_eval.report.diagnostics import DISTRIBUTION_KEYS

    def load(run: Path) -> dict[str, dict[str, Any]]:
        return {i: r for i, r in RunDir(run).records(DIAGNOSTICS).items() if r.get("error") is None}

    first, second = load(before), load(after)
    out: dict[str, Any] = {}
    for item_id in sorted(set(first) & set(second)):
        out.setdefault(first[item_id]["subset"], []).append(item_id)
    result: dict[str, Any] = {}
    for subset, ids in out.items():
        result[subset] = {}
        for key in DISTRIBUTION_KEYS:
            pairs = [(first[i][key], second[i][key]) for i in ids
                     if first[i].get(key) is not None and second[i].get(key) is not None]
            if not pairs:
                continue
            a, b = np.array(pairs, dtype=float).T
            change = paired_gap(b, a, n_resamples=n_resamples, seed=seed).to_dict()  # after − before
            result[subset][key] = {"before": float(a.mean()), "after": float(b.mean()), "change": change}
    return result


def distribution_lines(result: Mapping[str, Any]) -> list[str]:
    """The judge-free divergences before and after, as a Markdown section (empty without diagnostics)."""
    lines: list[str] = []
    if result.get("distribution"):
        lines += ["", "## Distribution gaps (judge-free), mean per token", "",
                  "The same fixed responses are teacher-forced before and after; change = after − before, paired by "
                  "item. KL text‖speech: the speech LLM given the typed vs the spoken query; KL text LLM‖speech LLM: "
                  "teacher vs student given the typed query.", "",
                  "| subset | divergence | before | after | change [95% CI] | p |", "|---|---|---|---|---|---|"]
        for subset, entry in result["distribution"].items():
            for key, d in entry.items():
                c = d["change"]
                lines.append(f"| {subset} | {key} | {d['before']:.4f} | {d['after']:.4f} | {c['value']:+.4f} "
                             f"[{fmt(c['ci_low'], 4)}, {fmt(c['ci_high'], 4)}] | {fmt(c['p_value'], 3)} |")
    return lines


def render_before_after_markdown(result: dict[str, Any], preamble: list[str] | None = None,
                                 plots: list[tuple[str, str]] | None = None) -> str:
    """``report.md`` of a distillation: worsened gaps first, then gaps, arm scores, plots, distribution gaps, notes."""
    worse = worse_lines(result)
    lines = ["# speechlm-eval distill: before / after", ""]
    if worse:
        lines += ["## A gap got worse", ""] + [f"- **{line}**" for line in worse] + [""]
    lines += list(preamble or []) + [
        "", "Gaps in points; change = after − before with a 95% paired-bootstrap CI and a paired test; "
        "recovered = 1 − gap_after / gap_before (shown where the gap before is positive).", "",
        "| subset | gap | n | before | after | change [95% CI] | p | recovered |", "|---|---|---|---|---|---|---|---|"]
    for subset, entry in result["subsets"].items():
        for gap in GAPS:
            g = entry["gaps"].get(gap)
            if g is None:
                continue
            rec = "–" if g["recovered"] is None else f"{100 * g['recovered']:.0f}%"
            lines.append(f"| {subset} | {gap} | {g['n']} | {g['before']:.2f} | {g['after']:.2f} | "
                         f"{g['change']:+.2f} [{fmt(g['ci_low'])}, {fmt(g['ci_high'])}] | {fmt(g['p_value'], 3)} | {rec} |")
    lines += ["", "## Arm scores", "", "| subset | arm | n | before | after | change [95% CI] | p |",
              "|---|---|---|---|---|---|---|"]
    for subset, entry in result["subsets"].items():
        for arm in ARMS:
            a = entry["arms"].get(arm)
            if a is None:
                continue
            lines.append(f"| {subset} | {arm} | {a['n']} | {a['before']:.2f} | {a['after']:.2f} | "
                         f"{a['change']:+.2f} [{fmt(a['ci_low'])}, {fmt(a['ci_high'])}] | {fmt(a['p_value'], 3)} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{caption}]({path})" for caption, path in plots]
    lines += distribution_lines(result)
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def read_comparison(out: Path) -> dict[str, Any]:
    """``comparison.json`` of a distillation's before/after report folder."""
    import json

    return json.loads((Path(out) / "comparison.json").read_text(encoding="utf-8"))


def is_significant(row: Mapping[str, Any], alpha: float) -> bool:
    p = row.get("p_value")
    return isinstance(p, (int, float)) and math.isfinite(p) and p < alpha


def change_class(kind: str, row: Mapping[str, Any], alpha: float) -> str:
    """``chg-worse`` / ``chg-better`` (significant) or ``chg-ns``: a gap is worse when it grows, an arm when it
    drops."""
    if not is_significant(row, alpha) or not row.get("change"):
        return "chg-ns"
    worse = row["change"] > 0 if kind == "gap" else row["change"] < 0
    return "chg-worse" if worse else "chg-better"


def worse_gaps(result: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """``(subset, gap, row)`` of every gap that grew (the distillation made it worse), significant or not."""
    return [(subset, gap, g) for subset, entry in result["subsets"].items() for gap in GAPS
            if (g := entry["gaps"].get(gap)) is not None and g["change"] > 0]


def worse_lines(result: Mapping[str, Any]) -> list[str]:
    alpha = result.get("alpha", 0.05)
    return [f"{gap} got worse on {subset}: {g['before']:.2f} → {g['after']:.2f} ({g['change']:+.2f} "
            f"[{fmt(g['ci_low'])}, {fmt(g['ci_high'])}], p={fmt(g['p_value'], 3)}"
            + (", significant)" if is_significant(g, alpha) else f", not significant at {alpha:g})")
            for subset, gap, g in worse_gaps(result)]


def _metric_of(run_results: Mapping[str, Any], subset: str) -> str:
    return str((run_results.get("subsets", {}).get(subset) or {}).get("metric", "score"))


def before_after_figures(result: Mapping[str, Any], before: Mapping[str, Any],
                         after: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    """Gaps and arm scores before and after, with each run's 95% CIs, the change starred where significant."""
    from speechlm_eval.report.plots import ARM_COLOURS, GAP_COLOURS, before_after_figure, render_figures

    alpha = result.get("alpha", 0.05)
    gap_rows, arm_rows = [], []
    for subset, entry in result["subsets"].items():
        b, a = before.get("subsets", {}).get(subset, {}), after.get("subsets", {}).get(subset, {})
        for gap, g in entry["gaps"].items():
            gap_rows.append({"label": f"{subset}\n{gap}", "metric": _metric_of(before, subset),
                             "colour": GAP_COLOURS.get(gap, "#666666"), "before": b.get(gap) or {},
                             "after": a.get(gap) or {}, "change": g["change"], "significant": is_significant(g, alpha)})
        for arm, row in entry["arms"].items():
            def arm_point(run: Mapping[str, Any]) -> dict[str, Any]:
                e = (run.get("arms") or {}).get(arm) or {}
                return {"value": e.get("score"), "ci_low": e.get("ci_low"), "ci_high": e.get("ci_high")}

            arm_rows.append({"label": f"{subset}\n{ARM_TITLES[arm]}", "metric": _metric_of(before, subset),
                             "colour": ARM_COLOURS.get(arm, "#666666"), "before": arm_point(b), "after": arm_point(a),
                             "change": row["change"], "significant": is_significant(row, alpha)})
    return render_figures([
        ("Gaps before and after distillation", lambda: before_after_figure(
            gap_rows, "Forgetting and inequivalence before (light) and after (dark), 95% CIs; change, * = significant",
            "gap (points)")),
        ("Arm scores before and after distillation", lambda: before_after_figure(
            arm_rows, "Arm scores before (light) and after (dark), 95% CIs; change, * = significant", "score")),
    ])


def _change_cell(kind: str, row: Mapping[str, Any], alpha: float) -> str:
    from speechlm_eval.report.html import esc

    text = f"{row['change']:+.2f} [{fmt(row['ci_low'])}, {fmt(row['ci_high'])}]"
    return f'<td class="{change_class(kind, row, alpha)}" title="{esc(row.get("test"))}, n={esc(row.get("n"))}">' \
           f"{esc(text)}</td>"


def render_before_after_html(result: Mapping[str, Any], preamble: list[str] | None,
                             figures: list[tuple[str, bytes]]) -> str:
    """``report.html`` of a distillation, from the gap page's renderer: the same shell and stylesheet, coloured
    changes, worsened gaps first, tables that stack on a phone, plots with CIs; no raw Markdown."""
    from speechlm_eval.report.html import esc, figures_html, inline_html, labelled, page_html

    alpha = result.get("alpha", 0.05)
    worse = worse_lines(result)
    alert = ""
    if worse:
        items = "".join(f"<li>{esc(line)}</li>" for line in worse)
        alert = (f'<div class="alert" role="alert"><h2>A gap got worse</h2><p>The distillation widened these gaps '
                 f"(change = after − before, paired over the same items):</p><ul>{items}</ul></div>")
    meta = "".join(f"<li>{inline_html(line.removeprefix('- '))}</li>" for line in preamble or [])
    gap_labels = ["subset", "gap", "n", "before", "after", "change [95% CI]", "p", "recovered"]
    gap_rows = []
    for subset, gap, g in ((s, gap, e["gaps"][gap]) for s, e in result["subsets"].items() for gap in GAPS
                           if gap in e["gaps"]):
        rec = "–" if g["recovered"] is None else f"{100 * g['recovered']:.0f}%"
        css = ' class="worse"' if g["change"] > 0 else ""
        cells = (f'<td class="name">{esc(subset)}</td><td class="name">{esc(gap)}</td><td>{g["n"]}</td>'
                 f'<td>{g["before"]:.2f}</td><td>{g["after"]:.2f}</td>{_change_cell("gap", g, alpha)}'
                 f'<td>{esc(fmt(g["p_value"], 3))}</td><td>{esc(rec)}</td>')
        gap_rows.append(f"<tr{css}>" + labelled(cells, gap_labels) + "</tr>")
    arm_labels = ["subset", "arm", "n", "before", "after", "change [95% CI]", "p"]
    arm_rows = []
    for subset, entry in result["subsets"].items():
        for arm in ARMS:
            a = entry["arms"].get(arm)
            if a is None:
                continue
            cells = (f'<td class="name">{esc(subset)}</td><td class="name">{esc(ARM_TITLES[arm])}</td>'
                     f'<td>{a["n"]}</td><td>{a["before"]:.2f}</td><td>{a["after"]:.2f}</td>'
                     f'{_change_cell("arm", a, alpha)}<td>{esc(fmt(a["p_value"], 3))}</td>')
            arm_rows.append("<tr>" + labelled(cells, arm_labels) + "</tr>")

    def table(labels: list[str], rows: list[str]) -> str:
        head = "".join(f'<th class="name">{esc(label)}</th>' if i < 2 else f"<th>{esc(label)}</th>"
                       for i, label in enumerate(labels))
        return (f'<div class="scroll"><table class="stack"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}'
                "</tbody></table></div>")

    legend = ('<p class="legend"><span class="chg-worse">significantly worse</span><span class="chg-better">'
              f'significantly better</span><span class="chg-ns">not significant</span>significant: paired-test p '
              f"below {alpha:g}; a gap is worse when it grows, a score when it drops.</p>")
    from speechlm_eval.report.html import markdown_sections_html

    notes = "".join(f"<li>{inline_html(n)}</li>" for n in result.get("notes", []))
    body = [
        "<h1>speechlm-eval distill: before / after</h1>",
        alert,
        f'<ul class="notes">{meta}</ul>' if meta else "",
        '<p class="small">Gaps in points; change = after − before with a 95% paired-bootstrap CI and a paired test; '
        "recovered = 1 − gap_after / gap_before (shown where the gap before is positive).</p>",
        "<h2>Gaps</h2>", table(gap_labels, gap_rows), legend,
        "<h2>Arm scores</h2>", table(arm_labels, arm_rows),
        "<h2>Plots</h2>", figures_html(figures) or "<p>Nothing to plot.</p>",
        markdown_sections_html(distribution_lines(result)),
        f'<h2>Notes</h2><ul class="notes">{notes}</ul>' if notes else "",
    ]
    return page_html("speechlm-eval distill: before / after", body)


def write_before_after(out: Path, before: Path, after: Path, preamble: list[str] | None = None) -> dict[str, Any]:
    """Write ``comparison.json``, ``report.md``, ``report.html`` and ``plots/*.png`` into ``out``."""
    from speechlm_eval.report.plots import write_plots

    result = before_after(before, after)
    # Written relative to the report ("before", "after"), so the folder can be moved or committed as it is.
    result.update(before=portable_path(str(before), out), after=portable_path(str(after), out))
    write_json_atomic(out / "comparison.json", result)
    figures = before_after_figures(result, RunDir(before).read_results(), RunDir(after).read_results())
    plots = write_plots(out, figures)
    markdown = render_before_after_markdown(result, preamble, plots)
    write_text_atomic(out / "report.md", markdown)
    write_text_atomic(out / "report.html", render_before_after_html(result, preamble, figures))
    return result
