"""Figures of ``report.html``: arm scores, paired gaps and the optional WER split, as deterministic PNG bytes.

Subsets are grouped into one panel per metric (acc, refusal_rate, ...) so no axis mixes scales. Rendering uses the
Agg canvas directly (no pyplot, no global backend switch) under matplotlib's default style, so a user's matplotlibrc
cannot change the bytes, and PNG metadata is stripped so the same results give the same image.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import matplotlib
import matplotlib.style
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from speechlm_eval.rundir import ARM_TITLES, ARMS

# Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
ARM_COLOURS = {"text_llm_text": "#0072B2", "speech_llm_text": "#E69F00", "speech_llm_speech": "#009E73"}
GAP_COLOURS = {"forgetting": "#D55E00", "inequivalence": "#CC79A7"}
BUCKET_COLOURS = ("#56B4E9", "#0072B2", "#E69F00", "#D55E00", "#CC79A7", "#009E73", "#F0E442", "#000000")
# Known ranges of headline metrics, so bars of different runs are drawn against the same axis; others autoscale.
METRIC_RANGES = {"acc": (0.0, 100.0), "total_accuracy": (0.0, 100.0), "refusal_rate": (0.0, 1.0), "gpt": (1.0, 5.0)}
DPI = 110
PANEL_HEIGHT_IN = 3.4
MAX_WIDTH_IN = 11.5
MIN_WIDTH_IN = 7.5  # room for the title and a one-row legend when there is only one subset
_RC = {"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
       "savefig.dpi": DPI, "path.simplify": False}
# A white halo keeps a bar's value label readable where its error bar runs through it.
_LABEL_HALO = [patheffects.withStroke(linewidth=2.2, foreground="white")]


def _short(value: float, metric: str) -> str:
    """A bar label: one decimal on 0-100 scales, two otherwise (0-1 rates, 1-5 ratings, unknown metrics)."""
    return f"{value:.1f}" if METRIC_RANGES.get(metric, (0.0, 1.0))[1] > 10 else f"{value:.2f}"


def by_metric(subsets: dict[str, dict[str, Any]], names: Iterable[str]) -> dict[str, list[str]]:
    """``{metric: [subset, ...]}`` for ``names``, metrics and subsets in first-seen order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(str(subsets[name].get("metric", "score")), []).append(name)
    return groups


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def significant(gap: dict[str, Any] | None) -> bool:
    """Whether a paired gap's test rejects "no gap" at the level matching its CI (p < 1 - confidence)."""
    if not gap or not _finite(gap.get("p_value")):
        return False
    confidence = gap.get("confidence")
    alpha = 1.0 - (float(confidence) if _finite(confidence) else 0.95)
    return float(gap["p_value"]) < alpha


def _yerr(value: float, low: Any, high: Any) -> tuple[float, float]:
    """Error-bar half-lengths below/above ``value`` (0 where a bound is missing; a percentile CI may sit off-centre)."""
    below = max(0.0, value - low) if _finite(low) else 0.0
    above = max(0.0, high - value) if _finite(high) else 0.0
    return below, above


def _panels(groups: dict[str, list[str]], min_slots: float = 1.6) -> tuple[Figure, list[Axes]]:
    """One panel per metric in a row, each as wide as its number of subsets (with a floor so a lone subset fits)."""
    ratios = [max(len(names), min_slots) for names in groups.values()]
    width = min(MAX_WIDTH_IN, max(MIN_WIDTH_IN, 1.6 + 1.25 * sum(ratios)))
    fig = Figure(figsize=(width, PANEL_HEIGHT_IN), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(ratios), width_ratios=ratios, squeeze=False)[0]
    return fig, list(axes)


def _set_metric_limits(ax: Axes, metric: str) -> None:
    if metric in METRIC_RANGES:
        low, high = METRIC_RANGES[metric]
        # Headroom above the top of the scale for the value labels of full-height bars.
        ax.set_ylim(min(0.0, low), high * 1.1)


def plain(text: str) -> str:
    """``text`` with ``$`` escaped, so matplotlib draws it as written instead of parsing it as mathtext."""
    return text.replace("$", r"\$")


def tick_label(name: str, limit: int = 20) -> str:
    """A subset name fit for a tick: each line shortened with an ellipsis, drawn as plain text."""
    return "\n".join(plain(line if len(line) <= limit else line[: limit - 1] + "…") for line in name.split("\n"))


def _finish_panel(ax: Axes, members: Sequence[str], metric: str, ylabel: str) -> None:
    """Subset ticks, the metric as title, the y label and a light horizontal grid behind the data."""
    _label_groups(ax, members)
    ax.set_ylabel(plain(ylabel))
    ax.set_title(plain(metric))
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)


def _label_groups(ax: Axes, names: Sequence[str]) -> None:
    labels = [tick_label(n) for n in names]
    # Tilt when the labels would collide: many groups, or several groups with long names.
    widest = max(len(line) for label in labels for line in label.split("\n"))
    tilt = len(labels) > 3 or (len(labels) > 1 and widest > 10 and "\n" not in "".join(labels))
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                       rotation_mode="anchor" if tilt else "default")
    ax.set_xlim(-0.6, len(labels) - 0.4)


def arm_scores_figure(subsets: dict[str, dict[str, Any]]) -> Figure | None:
    """Bars of the three arms per subset with 95% CI error bars, one panel per metric; None if nothing scored."""
    names = [s for s, e in subsets.items() if any(_finite(a.get("score")) for a in e.get("arms", {}).values())]
    if not names:
        return None
    groups = by_metric(subsets, names)
    fig, axes = _panels(groups)
    width = 0.26
    for ax, (metric, members) in zip(axes, groups.items()):
        for x, subset in enumerate(members):
            arms = subsets[subset].get("arms", {})
            present = [arm for arm in ARMS if arm in arms and _finite(arms[arm].get("score"))]
            # Centre the bars that exist, so a speech-only subset shows one bar in the middle of its slot.
            offsets = [(i - (len(present) - 1) / 2) * width for i in range(len(present))]
            for arm, offset in zip(present, offsets):
                entry = arms[arm]
                score = float(entry["score"])
                below, above = _yerr(score, entry.get("ci_low"), entry.get("ci_high"))
                ax.bar(x + offset, score, width * 0.92, color=ARM_COLOURS[arm],
                       yerr=[[below], [above]], capsize=3, error_kw={"elinewidth": 1, "ecolor": "#222222"})
                # A tick at the score keeps a score of 0 visible (an empty slot means the arm was not run).
                ax.hlines(score, x + offset - width * 0.46, x + offset + width * 0.46, colors=ARM_COLOURS[arm],
                          linewidth=2.5)
                ax.annotate(_short(score, metric), (x + offset, score), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7, path_effects=_LABEL_HALO, zorder=4)
        _finish_panel(ax, members, metric, metric)
        _set_metric_limits(ax, metric)
    handles = [Patch(color=ARM_COLOURS[a], label=ARM_TITLES[a]) for a in ARMS]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle("Arm scores (bars) with 95% bootstrap CIs", fontsize=10)
    return fig


def gaps_figure(subsets: dict[str, dict[str, Any]]) -> Figure | None:
    """Forgetting and inequivalence per subset as dots with 95% CI bars and a zero line; filled dot = significant."""
    names = [s for s, e in subsets.items()
             if any(_finite((e.get(g) or {}).get("value")) for g in GAP_COLOURS)]
    if not names:
        return None
    groups = by_metric(subsets, names)
    fig, axes = _panels(groups)
    for ax, (metric, members) in zip(axes, groups.items()):
        ax.axhline(0.0, color="#444444", linewidth=0.9, zorder=1)
        for x, subset in enumerate(members):
            for k, gap_name in enumerate(GAP_COLOURS):
                gap = subsets[subset].get(gap_name) or {}
                if not _finite(gap.get("value")):
                    continue
                value = float(gap["value"])
                below, above = _yerr(value, gap.get("ci_low"), gap.get("ci_high"))
                colour = GAP_COLOURS[gap_name]
                broken = bool(gap.get("front_end_failure"))
                ax.errorbar(x + (k - 0.5) * 0.3, value, yerr=[[below], [above]], fmt="X" if broken else "o",
                            capsize=3, color=colour, markerfacecolor=colour if significant(gap) else "white",
                            markersize=7 if broken else 6, elinewidth=1.2, zorder=3)
                if broken:
                    ax.annotate("front-end failure", (x + (k - 0.5) * 0.3, value), xytext=(4, 0),
                                textcoords="offset points", fontsize=7, color="#a0180b", va="center")
        _finish_panel(ax, members, metric, f"gap ({metric} points)")
    handles = [Line2D([], [], color=c, marker="o", linestyle="", label=g) for g, c in GAP_COLOURS.items()]
    handles.append(Line2D([], [], color="#666666", marker="o", markerfacecolor="white", linestyle="",
                          label="hollow: not significant"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    fig.suptitle("Paired gaps with 95% bootstrap CIs (above 0: the speech model / speech input does worse)",
                 fontsize=10)
    return fig


MIN_BUCKET_N = 5  # a WER bucket with fewer items is labelled with its n instead of drawn


def _bucket_n(gap: dict[str, Any] | None) -> int:
    n = (gap or {}).get("n")
    return int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else 0


def perception_shape_ok(perception: Any) -> bool:
    """True when ``perception`` is ``{"buckets": [label, ...], "inequivalence": {subset: [gap|None per bucket]}}``."""
    if not isinstance(perception, dict):
        return False
    buckets, gaps = perception.get("buckets"), perception.get("inequivalence")
    if not isinstance(buckets, list) or not buckets or not isinstance(gaps, dict) or not gaps:
        return False
    return all(isinstance(row, list) and len(row) == len(buckets)
               and all(g is None or isinstance(g, dict) for g in row) for row in gaps.values())


def wer_split_figure(subsets: dict[str, dict[str, Any]], perception: Any) -> Figure | None:
    """Inequivalence per subset split by the ASR word error rate of the spoken prompt (one bar per WER bucket).

    ``perception`` is ``results["diagnostics"]["perception"]``: ``{"buckets": [label, ...], "inequivalence":
    {subset: [paired-gap dict or None, one per bucket]}}``. None when it is absent or not in that shape.
    """
    if not perception_shape_ok(perception):
        return None
    buckets = [str(b) for b in perception["buckets"]]
    gaps: dict[str, list[dict[str, Any] | None]] = perception["inequivalence"]
    if not any(_bucket_n(g) >= MIN_BUCKET_N for row in gaps.values() for g in row):
        return None
    metric_of = {s: {"metric": (subsets.get(s) or {}).get("metric", "score")} for s in gaps}
    groups = by_metric(metric_of, gaps)
    fig, axes = _panels(groups)
    width = 0.8 / len(buckets)
    for ax, (metric, members) in zip(axes, groups.items()):
        ax.axhline(0.0, color="#444444", linewidth=0.9)
        for x, subset in enumerate(members):
            for k, gap in enumerate(gaps[subset]):
                if not gap or not _finite(gap.get("value")):
                    continue
                position = x + (k - (len(buckets) - 1) / 2) * width
                n = _bucket_n(gap)
                if n < MIN_BUCKET_N:  # a 1-item bucket's ±100 would be the tallest bar: say n, draw nothing
                    ax.annotate(f"n={n}\nnot drawn", (position, 0.0), xytext=(0, 3), textcoords="offset points",
                                ha="center", va="bottom", fontsize=6, color="#666666")
                    continue
                value = float(gap["value"])
                below, above = _yerr(value, gap.get("ci_low"), gap.get("ci_high"))
                ax.bar(position, value, width * 0.92,
                       color=BUCKET_COLOURS[k % len(BUCKET_COLOURS)], yerr=[[below], [above]], capsize=2,
                       error_kw={"elinewidth": 1, "ecolor": "#222222"})
                ax.annotate(f"n={n}", (position, 0.0), xytext=(0, -9 if value >= 0 else 3), textcoords="offset points",
                            ha="center", va="bottom", fontsize=6, color="#333333", path_effects=_LABEL_HALO)
        _finish_panel(ax, members, metric, f"inequivalence ({metric} points)")
    handles = [Patch(color=BUCKET_COLOURS[k % len(BUCKET_COLOURS)], label=plain(f"WER {b}"))
               for k, b in enumerate(buckets)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), frameon=False)
    fig.suptitle(f"Inequivalence by WER of the spoken prompt, with 95% CIs (n per bar; buckets under "
                 f"{MIN_BUCKET_N} items not drawn)", fontsize=10)
    return fig


def before_after_figure(rows: Sequence[dict[str, Any]], title: str, ylabel: str) -> Figure | None:
    """Before (light) and after (full colour) bars with 95% CIs per ``row``, one panel per metric; the change is
    written above each pair, starred when the paired test is significant.

    ``rows``: ``{"label", "metric", "colour", "before": {"value", "ci_low", "ci_high"}, "after": {...}, "change",
    "significant"}``.
    """
    rows = [r for r in rows if _finite((r.get("before") or {}).get("value")) and _finite((r.get("after") or {}).get("value"))]
    if not rows:
        return None
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(str(row["metric"]), []).append(row)
    fig, axes = _panels({m: [r["label"] for r in members] for m, members in groups.items()})
    width = 0.36
    for ax, (metric, members) in zip(axes, groups.items()):
        ax.axhline(0.0, color="#444444", linewidth=0.9, zorder=1)
        for x, row in enumerate(members):
            tops = []
            for k, (when, alpha) in enumerate((("before", 0.4), ("after", 1.0))):
                entry = row[when]
                value = float(entry["value"])
                below, above = _yerr(value, entry.get("ci_low"), entry.get("ci_high"))
                ax.bar(x + (k - 0.5) * width, value, width * 0.92, color=row["colour"], alpha=alpha,
                       yerr=[[below], [above]], capsize=3, error_kw={"elinewidth": 1, "ecolor": "#222222"})
                tops.append(value + above)
            star = "*" if row.get("significant") else ""
            ax.annotate(f"{row['change']:+.1f}{star}", (x, max(tops)), xytext=(0, 3), textcoords="offset points",
                        ha="center", va="bottom", fontsize=7, fontweight="bold" if star else "normal",
                        path_effects=_LABEL_HALO)
        _finish_panel(ax, [r["label"] for r in members], metric, plain(ylabel))
    handles = [Patch(color="#888888", alpha=0.4, label="before"), Patch(color="#888888", label="after")]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle(plain(title), fontsize=10)
    return fig


def figure_png(fig: Figure) -> bytes:
    """PNG bytes without the metadata that would vary between matplotlib versions."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buffer.getvalue()


def render_figures(makers: Sequence[tuple[str, Any]]) -> list[tuple[str, bytes]]:
    """``[(caption, png)]`` of the figures the ``(caption, make)`` pairs return (``None``: left out), rendered under
    matplotlib's default style so a user's rc settings cannot change the bytes."""
    out = []
    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        for caption, make in makers:
            fig = make()
            if fig is not None:
                out.append((caption, figure_png(fig)))
    return out


def report_figures(results: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``[(caption, png bytes), ...]`` for the report, in display order; panels with nothing to show are left out."""
    subsets = results.get("subsets", {})
    perception = (results.get("diagnostics") or {}).get("perception")
    out = []
    with matplotlib.style.context("default"), matplotlib.rc_context(_RC):
        for caption, make in (
            ("Arm scores per subset", lambda: arm_scores_figure(subsets)),
            ("Forgetting and inequivalence per subset", lambda: gaps_figure(subsets)),
            ("Inequivalence split by WER", lambda: wer_split_figure(subsets, perception)),
        ):
            fig = make()
            if fig is not None:
                out.append((caption, figure_png(fig)))
    return out


def plot_filename(caption: str) -> str:
    """``"Arm scores per subset"`` → ``"arm-scores-per-subset.png"``."""
    return "-".join("".join(c if c.isalnum() else " " for c in caption.lower()).split()) + ".png"


def write_plots(run_dir: Path, figures: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
    """Write each figure to ``run_dir/plots/<caption>.png`` (stale plots removed); returns ``[(caption, relative
    path), ...]`` for the Markdown report."""
    from speechlm_eval.records import write_atomic

    directory = Path(run_dir) / "plots"
    directory.mkdir(exist_ok=True)
    names = [plot_filename(caption) for caption, _ in figures]
    for stale in directory.glob("*.png"):
        if stale.name not in names:
            stale.unlink()
    for name, (_, png) in zip(names, figures):
        write_atomic(directory / name, png)
    return [(caption, f"plots/{name}") for name, (caption, _) in zip(names, figures)]
