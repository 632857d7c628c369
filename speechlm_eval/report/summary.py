"""The numbers a run ends with in the terminal: the scores-and-gaps table of ``gap`` and the before/after table of
``distill``, front-end failures first, as rich tables (plain text when the console is not a terminal)."""

from __future__ import annotations

from typing import Any, Mapping

from rich.console import Console
from rich.table import Table

from speechlm_eval.report.frontend import FRONT_END_HEADLINE, FRONT_END_TITLE, failure_lines
from speechlm_eval.report.markdown import fmt, fmt_gap
from speechlm_eval.rundir import ARM_TITLES, ARMS, GAPS


def front_end_warnings(results: Mapping[str, Any]) -> list[str]:
    """The lines to print before any number when a subset's audio was not heard."""
    failed = {s: e for s, e in (results.get("front_end") or {}).items() if e.get("failure")}
    if not failed:
        return []
    return [FRONT_END_TITLE, FRONT_END_HEADLINE.format(subsets=", ".join(failed)), *failure_lines(failed)]


def _arm_text(arm: Mapping[str, Any] | None) -> str:
    if arm is None or arm.get("score") is None:
        return "–"
    extra = f" ({arm['errors']} err)" if arm.get("errors") else ""
    return f"{arm['score']:.2f} [{fmt(arm.get('ci_low'))}, {fmt(arm.get('ci_high'))}]{extra}"


def gap_table(results: Mapping[str, Any], title: str = "speechlm-eval gap") -> Table:
    """One row per scored subset: n, metric, the three arms and the two gaps, as in ``report.md``."""
    table = Table(title=title, show_lines=False, title_justify="left")
    for name in ("subset", "n", "metric", *(ARM_TITLES[a] for a in ARMS), *GAPS):
        table.add_column(name, overflow="fold")
    for subset, entry in results.get("subsets", {}).items():
        arms = entry.get("arms", {})
        table.add_row(subset, str(entry.get("n")), str(entry.get("metric")), *(_arm_text(arms.get(a)) for a in ARMS),
                      *(fmt_gap(entry.get(g)) for g in GAPS))
    return table


def print_gap_summary(console: Console, results: Mapping[str, Any], title: str = "speechlm-eval gap") -> None:
    """Front-end failures (red, first), then the scores-and-gaps table."""
    warnings = front_end_warnings(results)
    if warnings:
        console.print(f"[bold red]{warnings[0]}[/]", highlight=False)
        for line in warnings[1:]:
            console.print(f"  {line}", style="red", highlight=False, soft_wrap=True, markup=False)
    print_table(console, gap_table(results, title))


PLAIN_WIDTH = 160  # a log file has no width: do not fold the table to 80 columns


def print_table(console: Console, table: Table) -> None:
    """A table at the terminal's width, or unfolded when the output is a file (CI logs, slurm)."""
    if console.is_terminal:
        console.print(table)
    else:  # rich caps a print's width at the console's (80 for a file): print through a wider one
        Console(file=console.file, width=max(console.width, PLAIN_WIDTH), no_color=True).print(table)


def before_after_table(result: Mapping[str, Any]) -> Table:
    """One row per subset and gap: before, after, change with its CI and p, recovered."""
    table = Table(title="speechlm-eval distill: before / after (points)", title_justify="left")
    for name in ("subset", "gap", "n", "before", "after", "change [95% CI]", "p", "recovered"):
        table.add_column(name, overflow="fold")
    for subset, entry in result.get("subsets", {}).items():
        for gap in GAPS:
            g = entry.get("gaps", {}).get(gap)
            if g is None:
                continue
            rec = "–" if g.get("recovered") is None else f"{100 * g['recovered']:.0f}%"
            table.add_row(subset, gap, str(g["n"]), f"{g['before']:.2f}", f"{g['after']:.2f}",
                          f"{g['change']:+.2f} [{fmt(g['ci_low'])}, {fmt(g['ci_high'])}]", fmt(g["p_value"], 3), rec)
    return table
