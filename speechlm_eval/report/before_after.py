"""The before/after report of a distillation: forgetting and inequivalence of the same suite, paired per item.

``recovered = 1 − gap_after / gap_before`` per subset and gap (only where the gap before is positive); the change of
each gap has a paired bootstrap CI and a paired test over the items scored in every arm of both runs (the machinery of
``speechlm-eval check``, :func:`speechlm_eval.report.check.compare_runs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speechlm_eval.metrics.paired import recovered
from speechlm_eval.records import write_json_atomic, write_text_atomic
from speechlm_eval.report.check import compare_runs
from speechlm_eval.report.markdown import fmt
from speechlm_eval.rundir import ARMS, DIAGNOSTICS, GAPS, RunDir, portable_path



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


def render_before_after_markdown(result: dict[str, Any], preamble: list[str] | None = None) -> str:
    lines = ["# speechlm-eval distill: before / after", ""] + list(preamble or []) + [
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
    if result["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def read_comparison(out: Path) -> dict[str, Any]:
    """``comparison.json`` of a distillation's before/after report folder."""
    import json

    return json.loads((Path(out) / "comparison.json").read_text(encoding="utf-8"))


def write_before_after(out: Path, before: Path, after: Path, preamble: list[str] | None = None) -> dict[str, Any]:
    """Write ``comparison.json``, ``report.md`` and ``report.html`` into ``out``."""
    from speechlm_eval.report.html import CSS, CSP, esc, markdown_sections_html

    result = before_after(before, after)
    # Written relative to the report ("before", "after"), so the folder can be moved or committed as it is.
    result.update(before=portable_path(str(before), out), after=portable_path(str(after), out))
    write_json_atomic(out / "comparison.json", result)
    markdown = render_before_after_markdown(result, preamble)
    write_text_atomic(out / "report.md", markdown)
    body = markdown_sections_html(markdown.splitlines()[1:])
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{esc(CSP)}">'
            f"<title>speechlm-eval distill: before / after</title><style>{CSS}</style></head>\n<body>\n"
            "<h1>speechlm-eval distill: before / after</h1>\n" + body + "\n</body></html>\n")
    write_text_atomic(out / "report.html", page)
    return result
