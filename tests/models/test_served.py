"""ServedModel: request shape and identity offline; against a real ``transformers serve`` on 127.0.0.1, greedy parity
with the in-process adapters, no lost prompt through injected faults, fast failure on refusals, and the audio path."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import time
import traceback

import numpy as np
import pytest
import soundfile as sf

from speechlm_eval.models.base import GenerationConfig, ModelInputError, Prompt
from speechlm_eval.models.served import (
    EndpointError,
    EndpointUnavailable,
    NotServable,
    RetryPolicy,
    ServedModel,
    load_served,
    public_url,
)
from tests.fixtures.served import SHIPPED_SPEECH_LLM, SHIPPED_TEXT_LLM, FaultProxy

KEY_ENV = "SPEECHLM_EVAL_TEST_SERVED_KEY"
SECRET = "sk-test-do-not-leak-0123456789"
GREEDY = GenerationConfig(max_new_tokens=8)
# Items per model-level check: enough to mix answer letters and lengths; every one of the 144 items, all three arms,
# goes through the served `gap` in tests/test_gap_served.py.
N_CHECK = 32
FAST_RETRY = RetryPolicy(max_attempts=6, initial_delay_s=0.05, max_delay_s=0.2)


@pytest.fixture(scope="module")
def organism_items():
    from speechlm_eval.data.suite import load_suite, parse_suite

    items, _ = load_suite(parse_suite("organism:organism_mcq@seed0"))
    assert len(items) == 144
    return items


@pytest.fixture(scope="module")
def text_prompts(organism_items) -> list[Prompt]:
    return [Prompt(text=item.text) for item in organism_items]


def in_process(path, prompts, config=GREEDY, batch_size=8):
    """The in-process adapter's answers, batched as the runner batches them (left-padded, 8 at a time)."""
    from speechlm_eval.models.registry import load_model

    model = load_model(str(path))
    answers = []
    for start in range(0, len(prompts), batch_size):
        answers += model.generate(prompts[start : start + batch_size], config)
    return model, answers


def assert_no_secret(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))
    assert SECRET not in text and SECRET not in str(error)


# ----- offline: request shape, identity, client-side checks -----

def test_request_body_text_greedy_and_sampling():
    model = ServedModel("m", "http://127.0.0.1:9")
    assert model.base_url == "http://127.0.0.1:9/v1" and model.endpoint == "http://127.0.0.1:9/v1/chat/completions"
    body = model.request_body(Prompt(text="Hi?"), GenerationConfig(max_new_tokens=7, seed=3))
    assert body == {"messages": [{"role": "user", "content": "Hi?"}], "max_tokens": 7, "seed": 3,
                    "temperature": 0.0}
    sampled = model.request_body(Prompt(text="Hi?", system="Be brief."),
                                 GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, seed=1))
    assert sampled["messages"][0] == {"role": "system", "content": "Be brief."}
    assert (sampled["temperature"], sampled["top_p"], sampled["seed"]) == (0.7, 0.9, 1)


def test_audio_part_precedes_text_and_is_lossless():
    audio = np.random.default_rng(0).uniform(-0.5, 0.5, 8000).astype(np.float32)
    (user,) = ServedModel("m", "http://h/v1").messages(Prompt(audio=audio, text="What is said?"))
    assert [part["type"] for part in user["content"]] == ["input_audio", "text"]
    part = user["content"][0]["input_audio"]
    assert part["format"] == "wav"
    decoded, rate = sf.read(io.BytesIO(base64.b64decode(part["data"])), dtype="float32")
    assert rate == 16_000 and decoded.ndim == 1 and np.array_equal(decoded, audio)
    (alone,) = ServedModel("m", "http://h/v1").messages(Prompt(audio=audio))
    assert [part["type"] for part in alone["content"]] == ["input_audio"]


def test_describe_and_repr_hold_no_credentials(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    model = load_served("org/model", f"https://user:{SECRET}@api.example.test:8443/v1?api-key={SECRET}#x",
                        api_key_env=KEY_ENV)
    described = model.describe()
    text = json.dumps(described) + repr(model) + model.endpoint
    assert SECRET not in text and "user" not in text
    assert described["family"] == "served" and described["id"] == "org/model"
    assert described["base_url"] == "https://api.example.test:8443/v1"
    assert described["api_key_env"] == KEY_ENV
    assert public_url("http://[::1]:8000/v1/?q=1") == "http://[::1]:8000/v1"


def test_teacher_forcing_is_not_servable():
    model = ServedModel("m", "http://h/v1")
    with pytest.raises(NotServable, match="continuation"):
        model.continuation_logprobs([Prompt(text="q")], ["a"])
    with pytest.raises(NotImplementedError, match="logits"):
        model.continuation_logits([Prompt(text="q")], ["a"])


def test_client_side_refusals_and_length_estimate():
    clip = np.zeros(16_000 * 7, dtype=np.float32)
    with pytest.raises(ModelInputError, match="text-only"):
        ServedModel("m", "http://h/v1", accepts_audio=False).generate([Prompt(audio=clip)], GREEDY)
    with pytest.raises(ModelInputError, match="at most 6 s"):
        ServedModel("m", "http://h/v1", max_audio_seconds=6.0).generate([Prompt(audio=clip)], GREEDY)
    model = ServedModel("m", "http://h/v1")
    assert model.prompt_length(Prompt(text="x" * 40)) == 11
    assert model.prompt_length(Prompt(audio=np.zeros(32_000, dtype=np.float32))) == 1 + 50
    with pytest.raises(ValueError, match="http"):
        ServedModel("m", "127.0.0.1:8000")


# ----- a real server: transformers serve, text LLM -----

@pytest.mark.slow
def test_text_llm_greedy_parity(organism_text_server, text_prompts):
    """(a) The served text LLM answers exactly as the in-process adapter (text, token counts, finish reason),
    although the server decodes each prompt alone and the adapter 8 left-padded at a time."""
    prompts = text_prompts[:N_CHECK]
    _, expected = in_process(SHIPPED_TEXT_LLM, prompts)
    got = load_served(organism_text_server.model, organism_text_server.base_url).generate(prompts, GREEDY)
    matches = sum(a == b for a, b in zip(got, expected))
    print(f"\nserved text LLM vs in-process: {matches}/{len(expected)} identical")
    assert len(got) == len(prompts)
    assert [g.text for g in got] == [e.text for e in expected]
    assert got == expected


@pytest.mark.slow
def test_faults_lose_nothing(organism_text_server, text_prompts):
    """(b) Through 429 + Retry-After, 500s and dropped connections (before and after the server answered), every
    prompt is answered once more than its faults, with the same answers, and Retry-After is waited out."""
    prompts = text_prompts[:20]  # every fault schedule of default_plan occurs among them
    direct = load_served(organism_text_server.model, organism_text_server.base_url).generate(prompts, GREEDY)
    with FaultProxy(organism_text_server.root_url, retry_after="1") as proxy:
        model = ServedModel(organism_text_server.model, proxy.base_url, retry=FAST_RETRY)
        got = model.generate(prompts, GREEDY)
    assert got == direct
    counts = proxy.log.counts()
    assert counts["forward"] == len(prompts)
    assert min(counts["429"], counts["500"], counts["drop"], counts["drop_after"]) > 0
    for attempts in proxy.log.attempts.values():
        actions = [action for action, _ in attempts]
        assert actions[-1] == "forward" and actions.count("forward") == 1
        for (action, at), (_, next_at) in itertools.pairwise(attempts):
            if action == "429":
                assert next_at - at >= 0.9, "Retry-After: 1 was not honoured"
    # One request per prompt was planned from its body: retries sent exactly the faults' count more, no extra.
    bodies_planned = sum(len(a) for a in proxy.log.attempts.values())
    assert bodies_planned == len(prompts) + sum(counts[a] for a in ("429", "500", "drop", "drop_after"))


@pytest.mark.slow
def test_timeouts_retried_and_exhaustion_reported(organism_text_server, text_prompts, monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)
    few = text_prompts[:3]
    with FaultProxy(organism_text_server.root_url, plan=lambda body: ["stall"], stall_s=2.5) as proxy:
        model = ServedModel(organism_text_server.model, proxy.base_url, timeout_s=1.0, retry=FAST_RETRY,
                            api_key_env=KEY_ENV)
        assert len(model.generate(few, GREEDY)) == 3
    assert proxy.log.counts() == {"stall": 3, "forward": 3}
    assert proxy.log.authorization == {f"Bearer {SECRET}"}  # the key is sent, to the server only

    with FaultProxy(organism_text_server.root_url, plan=lambda body: ["503"] * 10) as proxy:
        model = ServedModel(organism_text_server.model, proxy.base_url, api_key_env=KEY_ENV,
                            retry=RetryPolicy(max_attempts=3, initial_delay_s=0.01))
        with pytest.raises(EndpointUnavailable, match="failed 3 attempt") as caught:
            model.generate(few[:1], GREEDY)
    assert proxy.base_url in str(caught.value) and "HTTP 503" in str(caught.value)
    assert_no_secret(caught.value)
    assert proxy.log.counts() == {"503": 3}


@pytest.mark.slow
def test_refusals_fail_fast_without_the_key(organism_text_server, text_prompts, monkeypatch):
    """(c) An unknown model name (transformers serve pinned to a path answers 400) fails at the first answer, naming
    the endpoint and the server's reason; 401 and 404 are not retried either; the key never shows."""
    monkeypatch.setenv(KEY_ENV, SECRET)
    model = load_served("no-such-model", organism_text_server.base_url, api_key_env=KEY_ENV)
    start = time.monotonic()
    with pytest.raises(EndpointError, match="HTTP 400") as caught:
        model.generate(text_prompts[:2], GREEDY)
    assert time.monotonic() - start < 5.0
    message = str(caught.value)
    assert organism_text_server.base_url in message and "pinned" in message and "no-such-model" in message
    assert isinstance(caught.value, ValueError)  # bad input, not a flaky server
    assert_no_secret(caught.value)
    for status in ("401", "404"):
        with FaultProxy(organism_text_server.root_url, plan=lambda body, s=status: [s] * 10) as proxy:
            model = ServedModel(organism_text_server.model, proxy.base_url, api_key_env=KEY_ENV, retry=FAST_RETRY)
            with pytest.raises(EndpointError, match=f"HTTP {status}") as caught:
                model.generate(text_prompts[:1], GREEDY)
        assert proxy.log.counts() == {status: 1}
        assert_no_secret(caught.value)


@pytest.mark.slow
def test_runner_records_only_the_culprit(organism_text_server, organism_items):
    """A prompt the endpoint always refuses gets its own error record; its batch-mates keep their answers and are
    not asked twice when the runner retries the batch item by item."""
    from speechlm_eval.runner import ArmPlan, answer_batch

    batch = organism_items[:4]
    culprit = batch[2]

    def refuse_culprit(body: bytes) -> list[str]:
        return ["400"] * 10 if json.loads(body)["messages"][-1]["content"] == culprit.text else []

    with FaultProxy(organism_text_server.root_url, plan=refuse_culprit) as proxy:
        model = ServedModel(organism_text_server.model, proxy.base_url, retry=FAST_RETRY)
        plan = ArmPlan("text_llm_text", model, list(batch), with_audio=False)
        records = answer_batch(plan, batch, GREEDY, audio_source=lambda item: None)
    by_id = {r["id"]: r for r in records}
    assert set(by_id) == {item.id for item in batch}
    assert by_id[culprit.id]["error"] is not None and "HTTP 400" in by_id[culprit.id]["error"]["message"]
    assert all(by_id[i.id]["error"] is None and by_id[i.id]["response"] for i in batch if i is not culprit)
    assert proxy.log.counts() == {"forward": 3, "400": 2}


@pytest.mark.slow
def test_generate_from_inside_an_event_loop(organism_text_server, text_prompts):
    model = load_served(organism_text_server.model, organism_text_server.base_url)

    async def caller():
        return model.generate(text_prompts[:2], GREEDY)

    assert len(asyncio.run(caller())) == 2


# ----- a real server: transformers serve, Qwen2-Audio speech LLM -----

@pytest.mark.slow
def test_speech_llm_text_and_audio_parity(organism_speech_server, organism_items, text_prompts):
    """(d) The served Qwen2-Audio answers the items, typed and spoken (espeak-ng, sent as input_audio WAV), as the
    in-process adapter does."""
    from speechlm_eval.speech import CachedTTS, get_tts

    tts = CachedTTS(get_tts("espeak-ng"))
    text_prompts = text_prompts[:N_CHECK]
    audio_prompts = [Prompt(audio=tts.synthesize(item.text_to_speak())) for item in organism_items[:N_CHECK]]
    local, expected_text = in_process(SHIPPED_SPEECH_LLM, text_prompts)
    expected_audio = [a for start in range(0, len(audio_prompts), 8)
                      for a in local.generate(audio_prompts[start : start + 8], GREEDY)]
    model = load_served(organism_speech_server.model, organism_speech_server.base_url,
                        max_audio_seconds=local.max_audio_seconds)
    got_text = model.generate(text_prompts, GREEDY)
    got_audio = model.generate(audio_prompts, GREEDY)
    text_matches = sum(a == b for a, b in zip(got_text, expected_text))
    audio_matches = sum(a == b for a, b in zip(got_audio, expected_audio))
    print(f"\nserved speech LLM vs in-process: text {text_matches}/{N_CHECK}, audio {audio_matches}/{N_CHECK} "
          "identical")
    assert got_text == expected_text
    assert got_audio == expected_audio
    # The audio really reached the model: spoken prompts are longer (audio tokens) than the bare chat template.
    assert min(g.n_prompt_tokens for g in got_audio) > 30


@pytest.mark.slow
def test_replicas_share_the_load(organism_text_server, text_prompts):
    """Several base URLs (replicas without a router): requests spread over them, answers as from one server, and the
    usage adds up over both."""
    prompts = text_prompts[:12]
    direct = load_served(organism_text_server.model, organism_text_server.base_url).generate(prompts, GREEDY)
    with FaultProxy(organism_text_server.root_url, plan=lambda body: []) as one, \
            FaultProxy(organism_text_server.root_url, plan=lambda body: []) as two:
        model = load_served(organism_text_server.model, [one.base_url, two.base_url], concurrency=4)
        assert model.generate(prompts, GREEDY) == direct
    assert one.log.counts()["forward"] > 0 and two.log.counts()["forward"] > 0
    assert one.log.counts()["forward"] + two.log.counts()["forward"] == len(prompts)
    usage = model.usage()
    assert usage["calls"] == len(prompts) and usage["endpoint"] == f"{one.base_url}/chat/completions, " \
        f"{two.base_url}/chat/completions"
    assert model.describe()["base_url"] == f"{one.base_url}, {two.base_url}"
