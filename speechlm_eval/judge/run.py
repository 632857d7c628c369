"""Judging: the ``--judge`` spec to a judge, (item, response) pairs to judge outputs through the cache, and a whole
run directory's judge-scored subsets to ``judgements/<arm>.jsonl`` beside its records."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from speechlm_eval.judge.base import (
    JUDGE_RETRY,
    Judge,
    JudgeError,
    JudgeSettings,
    RetryPolicy,
    describe_judge,
    identity_digest,
)
from speechlm_eval.judge.cache import default_cache_dir, read_cached, write_cached
from speechlm_eval.judge.http import openai_judge
from speechlm_eval.judge.local import hf_judge
from speechlm_eval.judge.prompts import judge_prompt
from speechlm_eval.progress import stage
from speechlm_eval.rundir import RunDir
from speechlm_eval.scoring.judged import response_key
from speechlm_eval.scoring.registry import is_judged

if TYPE_CHECKING:
    from speechlm_eval.endpoint import Price

log = logging.getLogger(__name__)


def load_judge(
    spec: str,
    *,
    settings: JudgeSettings = JudgeSettings(),
    retry: RetryPolicy = JUDGE_RETRY,
    workers: int = 4,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    price: Price | None = None,
) -> Judge | None:
    """The judge a ``--judge`` spec names; ``None`` for ``none``.

    ``openai:MODEL`` posts to ``$SPEECHLM_EVAL_JUDGE_BASE_URL`` (default OpenAI) with the key from
    ``$SPEECHLM_EVAL_JUDGE_API_KEY`` or ``$OPENAI_API_KEY``, ``workers`` requests at a time (upstream uses 4).
    ``hf:PATH`` samples ``settings.n`` answers from a local model, seeded per prompt from ``seed``; the model is
    loaded on the first cache miss only (``device``/``dtype`` as for our model adapters). ``price`` (an endpoint
    judge's USD per million tokens) turns its token usage into a cost.
    """
    backend, _, target = spec.partition(":")
    if spec.strip() == "none":
        return None
    if backend == "openai" and target:
        return openai_judge(spec, target, settings, retry, workers, price)
    if backend == "hf" and target:
        return hf_judge(spec, target, settings, seed, device, dtype)
    raise JudgeError(f"unknown judge {spec!r}; use openai:MODEL (e.g. openai:gpt-4o-mini), hf:PATH or none")


def validate_judge(spec: str) -> None:
    """Fail fast on a judge that cannot work: a bad spec, a missing key, an unreachable or refusing endpoint
    (:func:`speechlm_eval.judge.http.check_endpoint`), a local judge path that does not exist. No model is loaded."""
    from pathlib import Path

    from speechlm_eval.judge.http import check_endpoint

    judge = load_judge(spec)
    if judge is None:
        return
    backend, _, target = spec.partition(":")
    if backend == "openai":
        check_endpoint(target)
    elif backend == "hf" and target.startswith(("/", ".", "~")) and not Path(target).expanduser().exists():
        raise JudgeError(f"judge model path {target} does not exist")


def judge_records(
    items: Sequence[Any], responses: Sequence[str], judge: Judge, cache_dir: str | Path | None = None
) -> list[list[str]]:
    """The ``n`` judge outputs for each (item, response), in order, calling the judge only on cache misses.

    Each prompt is built as upstream builds it (:func:`judge_prompt`); identical prompts are judged once. Results are
    cached as they arrive, so an interrupted run resumes where it stopped.
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    prompts = [judge_prompt(item, response) for item, response in zip(items, responses)]
    outputs: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(prompts):
        cached = read_cached(cache, judge.identity, prompt)
        if cached is not None:
            outputs[prompt] = cached
    missing = [p for p in dict.fromkeys(prompts) if p not in outputs]
    log.info("judge %s: %d prompts, %d cached, %d to judge", judge.spec, len(outputs) + len(missing), len(outputs),
             len(missing))
    with stage(f"judge {judge.spec}", total=len(missing), enabled=bool(missing)) as shown:
        for prompt, result in _complete_all(judge, missing):
            write_cached(cache, judge.identity, prompt, result)
            outputs[prompt] = result
            shown.advance()
    return [list(outputs[p]) for p in prompts]


def _complete_all(judge: Judge, prompts: Sequence[str]) -> Iterator[tuple[str, list[str]]]:
    """(prompt, outputs) as each finishes; on the first failure, pending prompts are cancelled and it re-raises."""
    if judge.workers <= 1 or len(prompts) <= 1:
        for prompt in prompts:
            yield prompt, judge.complete(prompt)
        return
    with ThreadPoolExecutor(max_workers=judge.workers) as pool:
        futures = {pool.submit(judge.complete, prompt): prompt for prompt in prompts}
        try:
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def judge_arm_rows(
    items: Sequence[Any], records: Mapping[str, Mapping[str, Any]], judge: Judge, cache_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """Judgement rows (see :func:`judgement_rows`) for the items of one arm that have a response without error."""
    answered = [item for item in items if records.get(item.id, {}).get("error") is None and item.id in records]
    responses = [records[item.id]["response"] for item in answered]
    return judgement_rows(answered, responses, judge_records(answered, responses, judge, cache_dir), judge)


def judgement_rows(
    items: Sequence[Any], responses: Sequence[str], outputs: Sequence[Sequence[str]], judge: Judge
) -> list[dict[str, Any]]:
    """One JSON-safe row per item, ``{"id", "response_sha256", "judge", "outputs"}``, to store beside the records.

    The response is stored as its hash: a row goes stale by itself when the record's response changes.
    """
    key = identity_digest(judge.identity)
    return [{"id": item.id, "response_sha256": response_key(response), "judge": key, "outputs": list(out)}
            for item, response, out in zip(items, responses, outputs)]


def judge_run(run_dir: str | Path, spec: str, *, seed: int = 0, device: str = "auto", dtype: str = "auto",
              cache_dir: Path | None = None, prices: Mapping[str, Price] | None = None) -> dict[str, Any]:
    """Judge every answered item of the judge-scored subsets in every arm; returns the judge's manifest entry.

    Judge outputs go to ``judgements/<arm>.jsonl`` (one row per item, keyed by the judged response's hash) and the
    judge's identity into the manifest, so ``speechlm-eval report`` can rebuild the scores from files alone. An
    endpoint judge's calls, retries and tokens (cost when ``prices`` names its model) are appended to the run's
    usage log; cache hits cost nothing and count nothing.
    """
    run = RunDir(run_dir)
    backend, _, target = spec.partition(":")
    price = (prices or {}).get(target) if backend == "openai" else None
    judge = load_judge(spec, seed=seed, device=device, dtype=dtype, price=price)
    description = describe_judge(judge)
    manifest = run.read_manifest()
    judged = [r for r in run.items(with_judgements=False) if r.scorer is not None and is_judged(r.scorer)]
    if judge is not None and judged:
        order = [r.id for r in judged]
        try:
            for arm, arm_records in run.arm_records().items():
                run.write_judgements(arm, judge_arm_rows(judged, arm_records, judge, cache_dir), order)
        finally:  # calls already made cost money even when a later one failed
            if judge.usage is not None:
                usage = judge.usage()
                if usage["attempts"]:
                    run.append_usage([{"role": "judge", **usage}])
    manifest.judge = description
    run.write_manifest(manifest)
    return description
