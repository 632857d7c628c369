"""lm-eval integration on real tiny checkpoints and a local 12-question task: the ``speechlm`` model against
lm-eval's own ``hf``, forgetting records and fragment, and the spoken log-likelihood arms end to end. Offline."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from speechlm_eval.lmeval import (  # noqa: E402
    SPOKEN_ARMS,
    SpeechLMHarness,
    choice_docs,
    choice_scores,
    harness_records,
    run_lmeval_tasks,
    spoken_records,
    task_manager_for,
)
from speechlm_eval.lmeval.run import run_spoken_arms  # noqa: E402
from speechlm_eval.report.lmeval import HARNESS_FORMAT, SPOKEN_FORMAT, lmeval_results, spoken_name  # noqa: E402
from speechlm_eval.lmeval.spoken import gold_indices  # noqa: E402
from speechlm_eval.models.base import Prompt  # noqa: E402
from speechlm_eval.models.registry import LoadOptions, load_model  # noqa: E402
from speechlm_eval.records import read_records  # noqa: E402

TASKS_DIR = Path(__file__).parent / "tasks"
TASK = "speechlm_tiny_mc"
GEN_TASK = "speechlm_tiny_gen"
N_DOCS = 12
CPU = LoadOptions(device="cpu")
LONG_DOC = 3  # its spoken question is ~17 s, past the tiny model's 10 s audio window


@pytest.fixture(scope="module")
def manager():
    return task_manager_for([TASK], TASKS_DIR)


@pytest.fixture(scope="module")
def task(manager):
    return manager.load([TASK])["tasks"][TASK]


@pytest.fixture(scope="module")
def speech(tiny_pair):
    return load_model(str(tiny_pair[0]), CPU)


@pytest.fixture(scope="module")
def tts():
    from speechlm_eval.speech import CachedTTS, get_tts

    return CachedTTS(get_tts("espeak-ng"))


def evaluate(model, path: Path | None, manager, batch_size: int = 4, limit: int | None = None) -> list[dict]:
    """lm-eval's own entry point: by model name and argument string, as a user would call it, or a built model."""
    args = {"model_args": f"pretrained={path}", "device": "cpu", "batch_size": batch_size} if path else {}
    results = lm_eval.simple_evaluate(model=model, tasks=[TASK], task_manager=manager, log_samples=True,
                                      bootstrap_iters=0, limit=limit, **args)
    return sorted(results["samples"][TASK], key=lambda s: s["doc_id"])


def loglikelihoods(samples: list[dict]) -> np.ndarray:
    """Per (doc, choice) log-likelihoods from logged samples, shape ``(n_requests,)``."""
    return np.array([resp[0][0] for s in samples for resp in s["resps"]])


def test_local_tasks_are_found_without_builtin_tasks(manager):
    assert manager.all_tasks == [GEN_TASK, TASK]  # include_defaults=False: lm-eval's ~10k tasks were not indexed


@pytest.mark.slow
def test_task_manager_falls_back_to_builtin_tasks():
    assert len(task_manager_for([TASK, "hellaswag"], TASKS_DIR).all_tasks) > 1000


def test_choice_docs_and_scores_follow_lm_eval(task):
    docs = choice_docs(task, TASK)
    assert [d.doc_id for d in docs] == list(range(N_DOCS))
    assert docs[0].context == "Question: Which of these animals is a mammal?\nAnswer:"
    assert docs[0].choices == ("shark", "whale", "trout", "eel") and docs[0].gold == (1,)
    assert docs[0].id == f"lmeval/{TASK}/0" and docs[0].subset == f"lmeval:{TASK}"
    assert [d.doc_id for d in choice_docs(task, TASK, limit=3)] == [0, 1, 2]
    # acc / acc_norm exactly as lm-eval's own process_results computes them from the same log-likelihoods.
    rng = np.random.default_rng(0)
    lm_docs = dict(task.doc_iterator())
    for _ in range(20):
        for doc in docs:
            lls = rng.normal(-10, 3, size=len(doc.choices))
            expected = task.process_results(lm_docs[doc.doc_id], [(ll, False) for ll in lls])
            ours = choice_scores(lls, doc)
            assert (ours["acc"], ours["acc_norm"]) == (expected["acc"], expected["acc_norm"])
    assert gold_indices("b", ["a", "b"]) == (1,) and gold_indices([0, "z", 5], ["a", "b"]) == (0, -100, -100)


def test_speechlm_equals_lm_eval_hf_per_document(tiny_pair, manager):
    text_dir = tiny_pair[1]
    assert get_model("speechlm") is SpeechLMHarness
    theirs, ours = evaluate("hf", text_dir, manager), evaluate("speechlm", text_dir, manager)
    assert [s["doc_id"] for s in ours] == [s["doc_id"] for s in theirs] == list(range(N_DOCS))
    assert [(s["acc"], s["acc_norm"]) for s in ours] == [(s["acc"], s["acc_norm"]) for s in theirs]
    assert [s["arguments"] for s in ours] == [s["arguments"] for s in theirs]
    np.testing.assert_allclose(loglikelihoods(ours), loglikelihoods(theirs), rtol=0, atol=1e-5)


def test_rolling_and_generation_equal_lm_eval_hf(tiny_pair):
    text_dir = str(tiny_pair[1])
    hf = get_model("hf").create_from_arg_string(f"pretrained={text_dir}", {"device": "cpu", "batch_size": 2})
    ours = get_model("speechlm").create_from_arg_string(f"pretrained={text_dir}", {"device": "cpu", "batch_size": 2})
    texts = ["Which of these animals is a mammal? A whale.", "The capital of France is Paris."]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    np.testing.assert_allclose(ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), atol=1e-4)
    gen = [Instance("generate_until", {}, (t, {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False}), i)
           for i, t in enumerate(texts)]
    generated = ours.generate_until(gen)
    assert generated == hf.generate_until(gen) and all(isinstance(g, str) for g in generated)


def test_speechlm_scores_the_text_path_of_qwen2_audio(tiny_identical_pair, tiny_pair, manager):
    speech_dir, text_dir = tiny_identical_pair
    lm = get_model("speechlm").create_from_arg_string(f"pretrained={speech_dir}", {"device": "cpu", "batch_size": 4})
    assert type(lm.model).__name__ == "Qwen2AudioForConditionalGeneration" and lm.backend == "causal"
    assert lm.get_model_info()["speechlm_eval"]["family"] == "qwen2-audio"
    # A Qwen2-Audio whose LM equals the text model exactly scores every request as the text model does under `hf`.
    from_speech = evaluate(lm, None, manager, limit=6)
    assert len(from_speech) == 6
    np.testing.assert_allclose(loglikelihoods(from_speech), loglikelihoods(evaluate("hf", text_dir, manager, limit=6)),
                               atol=1e-4)
    # ...and a perturbed one does not: the scores come from the speech model's own weights.
    perturbed = loglikelihoods(evaluate("speechlm", tiny_pair[0], manager, limit=6))
    assert len(perturbed) == len(loglikelihoods(from_speech))
    assert np.abs(perturbed - loglikelihoods(from_speech)).max() > 1e-3


def test_harness_records_keep_every_filter():
    samples = {"t": [
        {"doc_id": 1, "filter": "strict", "metrics": ["exact_match"], "exact_match": 0.0},
        {"doc_id": 1, "filter": "flexible", "metrics": ["exact_match"], "exact_match": 1.0},
        {"doc_id": 0, "filter": "strict", "metrics": ["exact_match", "f1"], "exact_match": True, "f1": (1, 0)},
    ]}
    records = {r["id"]: r for r in harness_records(samples, "text_llm_text")}
    assert set(records) == {"lmeval/t/0", "lmeval/t/1"}
    one = records["lmeval/t/1"]
    assert one["exact_match"] == 0.0 and one["filter"] == "strict"  # the task's first filter is the main one
    assert one["metrics"] == {"exact_match,strict": 0.0, "exact_match,flexible": 1.0}
    assert records["lmeval/t/0"]["exact_match"] == 1.0 and "f1" not in records["lmeval/t/0"]
    assert records["lmeval/t/0"]["metrics"]["f1,strict"] == [1, 0]


def test_spoken_arm_isolates_a_clip_the_model_refuses(speech, task, tts):
    docs = choice_docs(task, TASK, limit=LONG_DOC)

    def speak(text: str) -> np.ndarray:
        # doc 1's clip is too short to encode: the model refuses the whole batch, which is then retried doc by doc.
        return tts.synthesize(text)[:80] if text == docs[1].context else tts.synthesize(text)

    records = spoken_records(speech, docs, speak, batch_size=16)
    text_arm, speech_arm = (records[a] for a in SPOKEN_ARMS)
    assert [r["error"] is None for r in speech_arm] == [True, False, True]
    assert "too short" in speech_arm[1]["error"] and speech_arm[1]["acc"] is None
    assert all(r["error"] is None for r in text_arm)
    one_by_one = spoken_records(speech, [docs[2]], tts.synthesize, batch_size=1)[SPOKEN_ARMS[1]][0]
    np.testing.assert_allclose(speech_arm[2]["loglikelihoods"], one_by_one["loglikelihoods"], atol=1e-4)


def test_forgetting_records_and_fragment(tiny_pair, speech, tmp_path):
    # The speech LLM as an adapter already loaded (as a gap run holds it), the text LLM by path.
    run_lmeval_tasks(speech, str(tiny_pair[1]), [TASK], str(TASKS_DIR), tmp_path, batch_size=8, seed=0,
                     load_options=CPU)
    fragment = lmeval_results(tmp_path, seed=0, n_resamples=2000)  # from the records alone
    root = tmp_path / "lmeval"
    arms = ["text_llm_text", "speech_llm_text"]
    records = {arm: {r["doc_id"]: r for r in read_records(root / f"{arm}.jsonl")} for arm in arms}
    assert all(sorted(records[a]) == list(range(N_DOCS)) for a in arms)
    assert (root / "speech_llm_text.results.json").exists() and (root / "text_llm_text.results.json").exists()
    first = records["text_llm_text"][0]
    assert first["id"] == f"lmeval/{TASK}/0" and first["subset"] == f"lmeval:{TASK}" and first["acc"] in (0.0, 1.0)
    assert first["arm"] == "text_llm_text" and first["acc_norm"] in (0.0, 1.0)

    entry = fragment[f"lmeval:{TASK}"]
    assert entry["n"] == N_DOCS and entry["metric"] == "acc" and list(entry["arms"]) == arms
    assert "inequivalence" not in entry
    acc = {a: np.array([records[a][i]["acc"] for i in range(N_DOCS)]) for a in arms}
    assert not np.array_equal(acc["text_llm_text"], acc["speech_llm_text"])  # the perturbed student answers differently
    forgetting = entry["forgetting"]
    assert forgetting["n"] == N_DOCS and forgetting["test"] == "mcnemar-exact"
    assert math.isclose(forgetting["value"], 100 * (acc["text_llm_text"].mean() - acc["speech_llm_text"].mean()))
    assert forgetting["ci_low"] <= forgetting["value"] <= forgetting["ci_high"]
    for arm in arms:
        assert entry["arms"][arm]["score"] == pytest.approx(100 * acc[arm].mean()) and entry["arms"][arm]["n"] == N_DOCS
    assert lmeval_results(tmp_path, seed=0, n_resamples=2000) == fragment  # deterministic, from the records alone


def test_spoken_arms_measure_inequivalence(speech, manager, task, tts, tmp_path):
    root = tmp_path / "lmeval"
    n_docs = LONG_DOC + 1
    notes = run_spoken_arms(speech, manager, [TASK], root, limit=n_docs, batch_size=8, tts=tts)
    assert notes == {}
    records = {arm: {r["doc_id"]: r for r in read_records(root / f"{arm}.jsonl")} for arm in SPOKEN_ARMS}
    text_ll, speech_ll = (records[a] for a in SPOKEN_ARMS)
    assert sorted(text_ll) == sorted(speech_ll) == list(range(n_docs))
    # The long question is an error record, counted, and left out of the pairing; the short ones fit the window.
    assert "encoder window" in speech_ll[LONG_DOC]["error"] and speech_ll[LONG_DOC]["audio_seconds"] > 10
    assert all(speech_ll[i]["error"] is None and speech_ll[i]["audio_seconds"] < 10 for i in range(LONG_DOC))
    entry = lmeval_results(tmp_path, n_resamples=2000)[spoken_name(f"lmeval:{TASK}")]
    assert list(entry["arms"]) == list(SPOKEN_ARMS) and "forgetting" not in entry
    assert entry["prompt_format"] == SPOKEN_FORMAT
    assert entry["arms"][SPOKEN_ARMS[1]]["errors"] == 1 and entry["arms"][SPOKEN_ARMS[1]]["n"] == n_docs - 1
    assert entry["arms"][SPOKEN_ARMS[0]]["errors"] == 0 and entry["arms"][SPOKEN_ARMS[0]]["n"] == n_docs
    assert entry["inequivalence"]["n"] == n_docs - 1
    paired = [i for i in range(n_docs) if i != LONG_DOC]
    expected = 100 * (np.mean([text_ll[i]["acc"] for i in paired]) - np.mean([speech_ll[i]["acc"] for i in paired]))
    assert math.isclose(entry["inequivalence"]["value"], expected)
    # Both arms score each choice as the assistant's reply after the same chat prompt: text vs spoken context.
    doc = choice_docs(task, TASK, limit=1)[0]
    n = len(doc.choices)
    as_text = [lp.sum() for lp in speech.continuation_logprobs([Prompt(text=doc.context)] * n, list(doc.choices))]
    audio = tts.synthesize(doc.context)
    as_audio = [lp.sum() for lp in speech.continuation_logprobs([Prompt(audio=audio)] * n, list(doc.choices))]
    np.testing.assert_allclose(text_ll[0]["loglikelihoods"], as_text, atol=1e-4)
    np.testing.assert_allclose(speech_ll[0]["loglikelihoods"], as_audio, atol=1e-4)
    assert np.abs(np.array(as_text) - np.array(as_audio)).max() > 1e-3
    assert text_ll[0]["acc"] == choice_scores(as_text, doc)["acc"]


@pytest.mark.slow
def test_run_lmeval_tasks_end_to_end_with_a_generation_task(tiny_pair, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="speechlm_eval.progress")
    speech_dir, text_dir = tiny_pair
    notes = run_lmeval_tasks(str(speech_dir), str(text_dir), [TASK, GEN_TASK], str(TASKS_DIR), tmp_path,
                             batch_size=8, seed=0, spoken=True, load_options=CPU)
    fragment = lmeval_results(tmp_path, seed=0, n_resamples=2000)
    mc, gen = fragment[f"lmeval:{TASK}"], fragment[f"lmeval:{GEN_TASK}"]
    # One prompt format per row: lm-eval's prompt for forgetting, the chat template for the spoken log-likelihoods.
    spoken = fragment[spoken_name(f"lmeval:{TASK}")]
    assert list(mc["arms"]) == ["text_llm_text", "speech_llm_text"] and mc["prompt_format"] == HARNESS_FORMAT
    assert list(spoken["arms"]) == list(SPOKEN_ARMS) and "forgetting" not in spoken and "inequivalence" not in mc
    assert mc["forgetting"]["n"] == N_DOCS and spoken["inequivalence"]["n"] == N_DOCS - 1
    assert spoken_name(f"lmeval:{GEN_TASK}") not in fragment
    # A generation task is a forgetting probe too (its per-document exact_match), but it cannot be asked as spoken MC.
    assert gen["metric"] == "exact_match" and list(gen["arms"]) == ["text_llm_text", "speech_llm_text"]
    assert gen["forgetting"]["n"] == N_DOCS and "inequivalence" not in gen
    assert "not multiple_choice" in gen["notes"][0] and notes[GEN_TASK] == gen["notes"]  # kept in lmeval/notes.json
    assert "notes" not in mc
    # Every lm-eval stage reports its progress (a plain line when stderr is not a terminal).
    done = [r.getMessage() for r in caplog.records if r.name == "speechlm_eval.progress" and "[done]" in r.getMessage()]
    for stage in ("lm-eval loglikelihood", "lm-eval generate_until", "lm-eval typed log-likelihood",
                  "lm-eval spoken log-likelihood"):
        assert any(line.startswith(stage) for line in done), (stage, done)


def test_speechlm_eval_lm_eval_argv_and_device_fallback():
    from speechlm_eval.cli.lmeval import lm_eval_argv
    from speechlm_eval.lmeval.model import resolve_device

    assert lm_eval_argv(["--tasks", "x"]) == ["run", "--model", "speechlm", "--tasks", "x"]
    assert lm_eval_argv(["run", "--model", "hf", "--tasks", "x"]) == ["run", "--model", "hf", "--tasks", "x"]
    assert lm_eval_argv(["ls", "tasks"]) == ["ls", "tasks"]
    assert resolve_device(None) == "auto" and resolve_device("cpu") == "cpu"
    if not __import__("torch").cuda.is_available():
        assert resolve_device("cuda") == "auto"  # lm-eval's default device on a CPU-only host: no crash


@pytest.mark.slow
def test_lm_eval_command_line_with_speechlm(tiny_pair, tmp_path):
    """`speechlm-eval lm-eval` is lm-eval's command line with `speechlm` registered; no --model, no --device needed
    on a CPU-only host (lm-eval would hand the model "cuda")."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "speechlm_eval.cli", "lm-eval",
               "--model_args", f"pretrained={tiny_pair[0]}", "--tasks", TASK, "--include_path", str(TASKS_DIR),
               "--limit", "3", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "speechlm_tiny_mc" in done.stdout and list((tmp_path / "out").rglob("results_*.json"))
