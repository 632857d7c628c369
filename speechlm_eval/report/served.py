"""Summaries of what served models leave in a run directory, for results.json: the prompt-parity check
(``records/parity.jsonl``) and the endpoints' usage (``usage.jsonl``: calls, retries, tokens, cost)."""

from __future__ import annotations

from typing import Any

from speechlm_eval.rundir import ARMS, PARITY, RunDir

USAGE_COUNTS = ("calls", "attempts", "retries", "failed", "prompt_tokens", "completion_tokens", "audio_prompt_tokens",
                "unreported")


def parity_results(run: RunDir) -> dict[str, Any] | None:
    """Per arm: items compared, identical greedy answers, prompt token counts on each side, every difference."""
    if not run.records_path(PARITY).exists():
        return None
    records = list(run.records(PARITY).values())
    arms: dict[str, Any] = {}
    for arm in ARMS:
        entries = [(r["id"], r["arms"][arm]) for r in records if arm in r.get("arms", {})]
        if not entries:
            continue
        compared = [(i, e) for i, e in entries if e.get("compared")]
        served_tokens = [e["served_prompt_tokens"] for _, e in compared if e.get("served_prompt_tokens")]
        local_tokens = [e["in_process_prompt_tokens"] for _, e in compared]
        arms[arm] = {
            "n": len(entries),
            "compared": len(compared),
            "identical": sum(bool(e["identical"]) for _, e in compared),
            "not_compared": [{"id": i, "reason": e.get("reason")} for i, e in entries if not e.get("compared")],
            "prompt_tokens": {
                "served_mean": sum(served_tokens) / len(served_tokens) if served_tokens else None,
                "in_process_mean": sum(local_tokens) / len(local_tokens) if local_tokens else None,
                "served_reported": len(served_tokens),
                "equal": sum(e.get("served_prompt_tokens") == e["in_process_prompt_tokens"] for _, e in compared),
            },
            "differences": [{"id": i, "served": e["served"], "in_process": e["in_process"],
                             "served_prompt_tokens": e.get("served_prompt_tokens"),
                             "in_process_prompt_tokens": e["in_process_prompt_tokens"]}
                            for i, e in compared if not e["identical"]],
        }
    return {"arms": arms}


def usage_results(run: RunDir) -> list[dict[str, Any]]:
    """One row per (role, model, endpoint), summed over processes and sessions; ``cost_usd`` only when every line of
    the row was priced (a partly priced sum would understate the cost)."""
    grouped: dict[tuple[str, str, str], dict[str, Any]] = {}
    for line in run.usage_rows():
        key = (str(line.get("role")), str(line.get("model")), str(line.get("endpoint")))
        row = grouped.setdefault(key, {"role": key[0], "model": key[1], "endpoint": key[2],
                                       **{name: 0 for name in USAGE_COUNTS}, "cost_usd": 0.0, "priced": True,
                                       "n_fallback": False})
        for name in USAGE_COUNTS:
            row[name] += int(line.get(name) or 0)
        if line.get("cost_usd") is None:
            row["priced"] = False
        else:
            row["cost_usd"] += float(line["cost_usd"])
        row["n_fallback"] = row["n_fallback"] or bool(line.get("n_fallback"))
    out = []
    for row in grouped.values():
        if not row.pop("priced"):
            row["cost_usd"] = None
        out.append(row)
    return out
