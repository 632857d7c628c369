"""Summaries of the judge-free diagnostics (records/diagnostics.jsonl, records/perception.jsonl) for results.json.

The perception split answers "is the inequivalence a broken front end?": inequivalence is recomputed within WER
buckets of the speech LLM's own transcript of each item; a gap that persists among items it heard correctly is a
modality gap of a working audio path.
"""

from __future__ import annotations

from typing import Any, Mapping

from collections import Counter

import numpy as np

from speechlm_eval.metrics.paired import mean_ci, paired_gap
from speechlm_eval.rundir import DIAGNOSTICS, GAPS, PERCEPTION, RunDir

DISTRIBUTION_KEYS = ("kl_text_vs_speech", "jsd_text_vs_speech", "kl_text_llm_vs_speech_llm", "jsd_text_llm_vs_speech_llm")
# (label, upper WER bound inclusive); the last bucket takes the rest.
WER_BUCKETS: tuple[tuple[str, float], ...] = (("heard (WER ≤ 0.1)", 0.1), ("partly (0.1 < WER ≤ 0.3)", 0.3),
                                              ("misheard (WER > 0.3)", float("inf")))


def wer_bucket(wer: float) -> int:
    return next(k for k, (_, bound) in enumerate(WER_BUCKETS) if wer <= bound)


def distribution_summary(records: list[dict[str, Any]], seed: int, n_resamples: int) -> dict[str, Any]:
    """Per subset: mean of each per-item divergence with a bootstrap CI."""
    by_subset: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_subset.setdefault(r["subset"], []).append(r)
    out: dict[str, Any] = {}
    for subset, rows in by_subset.items():
        ok = [r for r in rows if r.get("error") is None]
        entry: dict[str, Any] = {"n": len(ok), "errors": len(rows) - len(ok),
                                 "response_from": ok[0]["response_from"] if ok else None}
        supports = sorted({r["text_llm_support"] for r in ok if r.get("text_llm_support")})
        if supports:
            entry["text_llm_support"] = supports[0]
        skipped = Counter(r["kl_text_llm_vs_speech_llm_skipped"] for r in ok if r.get("kl_text_llm_vs_speech_llm_skipped"))
        if skipped:
            entry["text_llm_skipped"] = dict(sorted(skipped.items()))
        for key in DISTRIBUTION_KEYS:
            values = np.array([r[key] for r in ok if r.get(key) is not None and np.isfinite(r[key])], dtype=float)
            if values.size:
                value, low, high = mean_ci(values, n_resamples=n_resamples, seed=seed)
                entry[key] = {"value": value, "ci_low": low, "ci_high": high, "n": int(values.size)}
            else:
                entry[key] = None
        out[subset] = entry
    return out


def perception_summary(records: list[dict[str, Any]], item_scores: Mapping[str, Mapping[str, Mapping[str, Any]]],
                       scales: Mapping[str, float], seed: int, n_resamples: int) -> dict[str, Any]:
    """WER per subset, and inequivalence (speech LLM · text − speech LLM · speech) within each WER bucket.

    ``item_scores``: ``{subset: {arm: {item id: Score | None}}}`` as the results builder computed them.
    """
    wer = {r["id"]: float(r["wer"]) for r in records if r.get("error") is None}
    subsets: dict[str, Any] = {}
    split: dict[str, list[dict[str, Any] | None]] = {}
    for subset in sorted({r["subset"] for r in records}):
        ids = [r["id"] for r in records if r["subset"] == subset and r["id"] in wer]
        values = np.array([wer[i] for i in ids], dtype=float)
        entry: dict[str, Any] = {"n": len(ids), "errors": sum(1 for r in records if r["subset"] == subset
                                                                and r.get("error") is not None)}
        if ids:
            entry.update(mean_wer=float(values.mean()),
                         share_heard=float(np.mean(values <= WER_BUCKETS[0][1])),
                         bucket_counts=[int(np.sum([wer_bucket(v) == k for v in values]))
                                        for k in range(len(WER_BUCKETS))])
            keyed = [r for r in records if r["subset"] == subset and r.get("error") is None and "key_heard" in r]
            if keyed:  # items that name their key phrase (Item.meta["key_phrase"], e.g. the organism's entities)
                entry.update(key_phrase_heard=float(np.mean([bool(r["key_heard"]) for r in keyed])),
                             key_phrase_n=len(keyed))
        subsets[subset] = entry
        arms = item_scores.get(subset, {})
        text_arm, speech_arm = GAPS["inequivalence"]
        if text_arm in arms and speech_arm in arms:
            text, speech = arms[text_arm], arms[speech_arm]
            gaps: list[dict[str, Any] | None] = []
            for k in range(len(WER_BUCKETS)):
                both = [i for i in ids if wer_bucket(wer[i]) == k and text.get(i) is not None
                        and speech.get(i) is not None]
                if not both:
                    gaps.append(None)
                    continue
                a = np.array([text[i].value for i in both], dtype=float)
                b = np.array([speech[i].value for i in both], dtype=float)
                gaps.append(paired_gap(a, b, scale=scales[subset], n_resamples=n_resamples, seed=seed).to_dict())
            split[subset] = gaps
    return {"buckets": [label for label, _ in WER_BUCKETS], "subsets": subsets, "inequivalence": split}


def diagnostics_results(run: RunDir, item_scores: Mapping[str, Any], scales: Mapping[str, float], seed: int,
                        n_resamples: int) -> dict[str, Any]:
    """The ``diagnostics`` object of results.json (empty when the run has no diagnostic records)."""
    out: dict[str, Any] = {}
    if run.records_path(DIAGNOSTICS).exists():
        out["distribution"] = distribution_summary(list(run.records(DIAGNOSTICS).values()), seed, n_resamples)
    if run.records_path(PERCEPTION).exists():
        out["perception"] = perception_summary(list(run.records(PERCEPTION).values()), item_scores, scales, seed,
                                               n_resamples)
    return out
