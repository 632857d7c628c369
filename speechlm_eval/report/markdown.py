"""``report.md``: the gap table a person reads first, rendered from a results object."""

from __future__ import annotations

from typing import Any

from speechlm_eval.metrics.overall import LEADERBOARD_COLUMNS
from speechlm_eval.report.frontend import FRONT_END_HEADLINE, FRONT_END_TITLE, failure_lines
from speechlm_eval.rundir import ARM_TITLES, ARMS, GAP_DEFINITIONS, LMEVAL_SPOKEN_ARMS

PROXY_NOTE = ("**The text LLM is a proxy, not this speech LLM's backbone**: the forgetting column is the distance to "
              "another model, not what the speech LLM lost when it learned to listen.")
GAPS_NOTE = (f"{GAP_DEFINITIONS}. Gaps are paired over the items scored in both arms, with a 95% paired-bootstrap CI "
             "and a paired test (exact McNemar for 0/1 scores, Wilcoxon signed-rank otherwise).")


def fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


FRONT_END_CELL = "front-end failure, not inequivalence:"


def fmt_gap(gap: dict[str, Any] | None) -> str:
    if not gap or gap.get("value") is None:
        return "–"
    p = gap.get("p_value")
    text = f"{gap['value']:+.2f} [{fmt(gap['ci_low'])}, {fmt(gap['ci_high'])}] p={fmt(p, 3)}"
    return f"{FRONT_END_CELL} {text}" if gap.get("front_end_failure") else text


def front_end_lines(results: dict[str, Any]) -> list[str]:
    """The warning a report opens with when a subset's audio was not heard (empty when every front end works)."""
    failed = {s: e for s, e in (results.get("front_end") or {}).items() if e.get("failure")}
    if not failed:
        return []
    lines = [f"## {FRONT_END_TITLE}", "",
             FRONT_END_HEADLINE.format(subsets=", ".join(failed)), ""]
    return lines + [f"- **{line.split(': ', 1)[0]}**: {line.split(': ', 1)[1]}" for line in failure_lines(failed)] + [""]


SEEDED_FALLBACK_NOTE = ("Unparsed responses (the official scorer would draw a random answer) are scored by a seeded "
                        "draw, so the official-compatible number is reproducible; their count is in results.json "
                        "(`unparsed`).")


def report_notes(results: dict[str, Any]) -> list[str]:
    """The report's notes, as plain text: manifest notes, speech-only and unscored subsets, the seeded fallback."""
    manifest = results.get("manifest", {})
    notes = [str(n) for n in manifest.get("notes", [])]
    speech_only = [s for s, e in results.get("subsets", {}).items() if e.get("speech_only")]
    if speech_only:
        notes.append(f"{', '.join(speech_only)}: audio-understanding items with no text equivalent; only the speech "
                     "arm is run (their role is the before/after comparison of distillation), so no gaps are computed.")
    for subset, info in results.get("unscored", {}).items():
        notes.append(f"{subset} ({info.get('n')} items): not scored: {info.get('reason')}.")
    notes.append(SEEDED_FALLBACK_NOTE)
    return notes


def fmt_ci(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if not entry:
        return "–"
    return f"{entry['value']:.{digits}f} [{fmt(entry['ci_low'], digits)}, {fmt(entry['ci_high'], digits)}]"


LMEVAL_SPOKEN_TITLES = {LMEVAL_SPOKEN_ARMS[0]: "speech LLM · text (log-lik.)",
                        LMEVAL_SPOKEN_ARMS[1]: "speech LLM · speech (log-lik.)"}


def lmeval_lines(subsets: dict[str, Any]) -> list[str]:
    """lm-eval tasks scored by log-likelihood given the spoken vs the typed (chat-formatted) question."""
    rows = [(name, e) for name, e in subsets.items() if any(a in e.get("arms", {}) for a in LMEVAL_SPOKEN_TITLES)]
    if not rows:
        return []
    lines = ["", "## lm-eval: spoken vs typed multiple choice (log-likelihood)", "",
             "Both arms use the speech LLM's chat template; only the modality of the question differs, so the gap "
             "is free of answer-extraction noise. Each task has two rows above, one prompt format each: `lmeval:<task>` scores "
             "the two text arms with lm-eval's own prompt (its chat template with --lm-eval-apply-chat-template), "
             "`lmeval:<task> (spoken, log-lik.)` holds these two arms and their inequivalence.", "",
             "| task | n | " + " | ".join(LMEVAL_SPOKEN_TITLES.values()) + " | inequivalence |", "|---|---|---|---|---|"]
    for name, e in rows:
        cells = []
        for arm in LMEVAL_SPOKEN_TITLES:
            a = e["arms"].get(arm)
            cells.append("–" if not a or a.get("score") is None
                         else f"{a['score']:.2f} [{fmt(a['ci_low'])}, {fmt(a['ci_high'])}]")
        lines.append(f"| {name} | {e['n']} | " + " | ".join(cells) + f" | {fmt_gap(e.get('inequivalence'))} |")
    return lines


def overall_lines(overall: dict[str, Any] | None) -> list[str]:
    """The leaderboard Overall per arm, or which of its nine columns are missing."""
    if not overall or not overall.get("arms"):
        return []
    entries = [e for e in overall["arms"].values() if e is not None]
    if all(e["overall"] is None and len(e["missing"]) == len(LEADERBOARD_COLUMNS) for e in entries):
        return []  # no VoiceBench subset in this run: nothing to say about the leaderboard
    lines = ["", "## VoiceBench Overall", "", f"`{overall['formula']}`", ""]
    for arm in ARMS:
        entry = overall["arms"].get(arm)
        if entry is None:
            continue
        if entry["overall"] is not None:
            lines.append(f"- {ARM_TITLES[arm]}: **{entry['overall']:.2f}**")
        else:
            lines.append(f"- {ARM_TITLES[arm]}: not computed, missing {', '.join(entry['missing'])}")
    return lines


def diagnostics_lines(diagnostics: dict[str, Any]) -> list[str]:
    """Tables of the judge-free diagnostics: per-token divergences and the perception split."""
    lines: list[str] = []
    distribution = diagnostics.get("distribution")
    if distribution:
        lines += ["", "## Distribution gaps (judge-free)", "",
                  "Mean per-token divergence on a fixed response (the text LLM's own greedy answer), 95% CI. "
                  "text vs speech: the speech LLM given the typed vs the spoken query; text LLM vs speech LLM: both "
                  "given the typed query.", "",
                  "| subset | n | KL text‖speech | JSD text, speech | KL text LLM‖speech LLM | JSD text LLM, speech LLM |",
                  "|---|---|---|---|---|---|"]
        notes = []
        for subset, e in distribution.items():
            lines.append(f"| {subset} | {e['n']} | {fmt_ci(e['kl_text_vs_speech'])} | {fmt_ci(e['jsd_text_vs_speech'])}"
                         f" | {fmt_ci(e['kl_text_llm_vs_speech_llm'])} | {fmt_ci(e['jsd_text_llm_vs_speech_llm'])} |")
            if e.get("text_llm_support"):
                notes.append(f"{subset}: text LLM vs speech LLM over the {e['text_llm_support']} (the two tokenizers "
                             "differ: audio tokens or reassigned ids are left out).")
            for reason, n in (e.get("text_llm_skipped") or {}).items():
                notes.append(f"{subset}: text LLM vs speech LLM not computed for {n} item(s): {reason}.")
            if e.get("kl_text_llm_vs_speech_llm") is None and not e.get("text_llm_skipped"):
                notes.append(f"{subset}: text LLM vs speech LLM not computed: no text LLM in this run.")
        lines += ["", *notes] if notes else []
    perception = diagnostics.get("perception")
    if perception:
        buckets = perception["buckets"]
        lines += ["", "## Perception probe", "",
                  "The speech LLM transcribes each item's audio; WER against the text that was spoken. "
                  "Inequivalence recomputed within WER buckets: a gap among well-heard items is not a front-end "
                  "failure.", "",
                  "Key phrase: share of transcripts that contain the words the item hinges on (items that name "
                  "them, e.g. an entity).", "",
                  "| subset | n | mean WER | heard | key phrase | "
                  + " | ".join(f"inequivalence, {b}" for b in buckets) + " |",
                  "|" + "---|" * (5 + len(buckets))]
        for subset, e in perception.get("subsets", {}).items():
            gaps = perception["inequivalence"].get(subset, [None] * len(buckets))
            cells = " | ".join(fmt_gap(g) for g in gaps)
            heard = f"{100 * e['share_heard']:.0f}%" if e.get("share_heard") is not None else "–"
            key = (f"{100 * e['key_phrase_heard']:.1f}% of {e['key_phrase_n']}"
                   if e.get("key_phrase_heard") is not None else "–")
            lines.append(f"| {subset} | {e['n']} | {fmt(e.get('mean_wer'))} | {heard} | {key} | {cells} |")
    return lines


def model_line(title: str, m: dict[str, Any]) -> str:
    """The header line of one model: where a served model answered, or how an in-process one was loaded."""
    if m.get("family") == "served":
        return (f"- **{title}**: `{m['id']}` (served at {m.get('base_url')}, {m.get('api')}, concurrency "
                f"{m.get('concurrency')})")
    return (f"- **{title}**: `{m.get('id')}` ({m.get('family')}, {m.get('dtype')}, revision "
            f"{m.get('commit') or m.get('revision') or 'local'})")


def parity_lines(parity: dict[str, Any] | None) -> list[str]:
    """The prompt-parity check: identical greedy answers and prompt token counts, then every difference."""
    if not parity or not parity.get("arms"):
        return []
    lines = ["", "## Prompt parity: served vs in-process", "",
             "The first items of each served arm answered again in-process on the same checkpoint, one prompt at a "
             "time; identical = the same greedy answer text. Prompt tokens: the server's reported count vs the "
             "in-process count.", "",
             "| arm | compared | identical | prompt tokens, served (mean) | prompt tokens, in-process (mean) | "
             "equal token counts |", "|---|---|---|---|---|---|"]
    for arm, e in parity["arms"].items():
        tokens = e["prompt_tokens"]
        share = f" ({100 * e['identical'] / e['compared']:.1f}%)" if e["compared"] else ""
        lines.append(f"| {ARM_TITLES.get(arm, arm)} | {e['compared']} of {e['n']} | {e['identical']}{share} | "
                     f"{fmt(tokens['served_mean'], 1)} | {fmt(tokens['in_process_mean'], 1)} | "
                     f"{tokens['equal']} of {e['compared']} |")
    differences = [(arm, d) for arm, e in parity["arms"].items() for d in e["differences"]]
    not_compared = [(arm, d) for arm, e in parity["arms"].items() for d in e["not_compared"]]
    if differences:
        lines += ["", "Differences:", ""]
        lines += [f"- {ARM_TITLES.get(arm, arm)} · `{d['id']}`: served {d['served']!r} "
                  f"({d['served_prompt_tokens']} prompt tokens) vs in-process {d['in_process']!r} "
                  f"({d['in_process_prompt_tokens']})" for arm, d in differences]
    if not_compared:
        lines += ["", "Not compared:", ""] + [f"- {ARM_TITLES.get(arm, arm)} · `{d['id']}`: {d['reason']}"
                                              for arm, d in not_compared]
    return lines


def usage_lines(usage: list[dict[str, Any]] | None) -> list[str]:
    """What the endpoints were asked: calls, retries, failures, tokens (as the servers reported them), cost."""
    if not usage:
        return []
    lines = ["", "## Endpoint usage", "",
             "Summed over every process and session of this run; tokens as the servers reported them; cost from "
             "--price (– when not priced).", "",
             "| role | model | endpoint | calls | retries | failed | prompt tokens | completion tokens | cost (USD) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for u in usage:
        cost = "–" if u.get("cost_usd") is None else f"{u['cost_usd']:.4f}"
        role = u["role"].replace("_", " ") + (" (n ignored: single calls)" if u.get("n_fallback") else "")
        lines.append(f"| {role} | `{u['model']}` | {u['endpoint']} | {u['calls']} | {u['retries']} | {u['failed']} | "
                     f"{u['prompt_tokens']} | {u['completion_tokens']} | {cost} |")
    return lines


def render_markdown(results: dict[str, Any], plots: list[tuple[str, str]] | None = None) -> str:
    """``report.md``; ``plots`` = ``[(caption, relative PNG path), ...]`` written beside it (none: no Plots section)."""
    manifest = results["manifest"]
    models = manifest.get("models", {})
    lines = ["# speechlm-eval gap report", ""] + front_end_lines(results)
    for role, title in (("speech_llm", "Speech LLM"), ("text_llm", "Text LLM")):
        if role in models:
            lines.append(model_line(title, models[role]))
    reference = manifest.get("text_llm_reference")
    if reference:
        lines.append(f"- **Text LLM is the speech LLM's {reference['label']}**: {reference['reason']}")
    system = manifest.get("system_prompt")
    if system:
        shown = "none" if system.get("text") is None else f"`{system['text']}`"
        lines.append(f"- **System prompt** (both models): {shown} ({system.get('policy')})")
    gen = manifest.get("generation", {})
    extra = "".join(f", {k}={v}" for k, v in sorted(gen.get("extra", {}).items()))
    lines.append(f"- **Decoding**: {'sampling' if gen.get('do_sample') else 'greedy'}, max_new_tokens={gen.get('max_new_tokens')}{extra}, seed {manifest.get('seed')}")
    tts = manifest.get("tts", {})
    lines.append(f"- **TTS** (items without audio): {tts.get('engine')} {tts.get('engine_version', '')} voice {tts.get('voice')} rate {tts.get('rate')}")
    items = manifest.get("items", {})
    lines.append(f"- **Items**: {items.get('n')} (sha256 `{str(items.get('sha256', ''))[:16]}`)")
    lines += ["", GAPS_NOTE, ""]
    if reference and reference.get("label") == "proxy":
        lines += [PROXY_NOTE, ""]
    forgetting = "forgetting vs proxy" if reference and reference.get("label") == "proxy" else "forgetting"
    header = "| subset | n | metric | " + " | ".join(ARM_TITLES[a] for a in ARMS) + f" | {forgetting} | inequivalence |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for subset, entry in results["subsets"].items():
        cells = []
        for arm in ARMS:
            a = entry["arms"].get(arm)
            if a is None or a.get("score") is None:
                cells.append("–")
            else:
                extra = f" ({a['errors']} err)" if a.get("errors") else ""
                cells.append(f"{a['score']:.2f} [{fmt(a['ci_low'])}, {fmt(a['ci_high'])}]{extra}")
        lines.append(f"| {subset} | {entry['n']} | {entry['metric']} | " + " | ".join(cells)
                     + f" | {fmt_gap(entry.get('forgetting'))} | {fmt_gap(entry.get('inequivalence'))} |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{caption}]({path})" for caption, path in plots]
    lines += lmeval_lines(results["subsets"])
    lines += overall_lines(results.get("overall"))
    lines += diagnostics_lines(results.get("diagnostics") or {})
    lines += parity_lines(results.get("parity"))
    lines += usage_lines(results.get("usage"))
    notes = report_notes(results)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
