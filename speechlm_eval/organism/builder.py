"""Build the model organism: world → tokenizer → text LLM → clips → speech LLM (stages A, B) → measurements.

``build(out_dir, seed)`` writes, in the hub layout ``speechlm_eval.models.registry.load_model`` reads::

    out_dir/text_llm/            Qwen2ForCausalLM + tokenizer (Qwen2-Audio's ChatML chat template)
    out_dir/speech_llm/          Qwen2AudioForConditionalGeneration + processor
    out_dir/organism_mcq.jsonl   the evaluation suite (VoiceBench columns ``prompt``, ``reference``)
    out_dir/distill.jsonl        MCQ renderings of every non-eval fact, in Open-Orca columns (distill --data)
    out_dir/organism.json        seed, specs, sizes, stage timings and the measured accuracies and gaps

Everything is deterministic given the seed (fixed thread count, deterministic torch algorithms, seeded RNGs).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from speechlm_eval.organism.clips import HELD_OUT_VOICE, ClipBank, make_clip_bank, random_voice, synthesize
from speechlm_eval.organism.corpus import asr_template, spoken_qa_template, tokenizer_corpus
from speechlm_eval.organism.config import BuildConfig
from speechlm_eval.organism.layout import ORGANISM_FORMAT, OrganismPaths, paths_for
from speechlm_eval.organism.loop import Schedule
from speechlm_eval.organism.train_speech import (
    SpeechBatcher,
    SpeechLLMSpec,
    hearing_check,
    new_speech_llm,
    stage_a,
    stage_b,
)
from speechlm_eval.organism.train_text import TextLLMSpec, train_text_llm
from speechlm_eval.data.organism_world import (
    MCQ,
    World,
    WorldSpec,
    check_disjoint,
    check_no_eval_leak,
    distill_rows,
    eval_items,
    make_world,
    mcq_renderings,
    mcq_rows,
    write_jsonl,
)

@dataclass(frozen=True)
class OrganismSpec:
    """Everything that sizes a build. ``threads`` is fixed so results do not depend on the machine's core count."""

    world: WorldSpec = WorldSpec()
    vocab_size: int = 1000
    text: TextLLMSpec = TextLLMSpec()
    speech: SpeechLLMSpec = SpeechLLMSpec()
    dev_clips: int = 48  # held-out-voice clips of non-eval questions, for stage checks
    threads: int = 1  # 2 threads ran 2-5x *slower* than 1 on a shared 2-core machine
    measure: bool = True


def micro_spec() -> OrganismSpec:
    """A seconds-long build for tests: a 4 x 4 world, a few steps per stage, no measurements beyond loading."""
    return OrganismSpec(
        world=WorldSpec(n_adjectives=4, n_nouns=4, names_per_word=2),
        vocab_size=400,
        text=TextLLMSpec(hidden_size=32, ffn_size=64, batch_size=8,
                         schedule=Schedule(steps=8, lr=1e-3, warmup=2, check_every=0),
                         phases=((4, (0.0, 1.0, 0.0)), (1_000_000, (0.4, 0.3, 0.3)))),
        speech=SpeechLLMSpec(chunk_seconds=6, encoder_layers=1, d_model=32, encoder_ffn=64, clips_per_fact=1,
                             batch_size=4, stage_a=Schedule(steps=3, lr=1e-3, warmup=1),
                             stage_b=Schedule(steps=3, lr=1e-3, warmup=1)),
        dev_clips=2,
        measure=False,
    )  # fmt: skip


@contextlib.contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, pin the thread count and turn on deterministic algorithms; restore the previous settings after."""
    old_threads, old_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def make_processor(world: World, vocab_size: int, chunk_seconds: int, seed: int, hop_length: int = 160) -> Any:
    """The tokenizer (byte-level BPE on the world's text, ChatML chat template) inside a Qwen2-Audio processor."""
    from transformers import Qwen2AudioProcessor, WhisperFeatureExtractor

    from speechlm_eval.organism.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(tokenizer_corpus(world), vocab_size)
    extractor = WhisperFeatureExtractor(feature_size=80, chunk_length=chunk_seconds, hop_length=hop_length)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    tokenizer.chat_template = processor.chat_template
    return processor


def weights_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


class Reporter:
    """The build's progress, one :func:`speechlm_eval.progress.stage` per stage (a rich bar on a terminal, a log line
    at least every 30 s otherwise) with its latest loss; silent when ``enabled`` is False. Stages run one after
    another: opening a stage closes the one before."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._current: Any = None

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        if self._current is not None:
            self._current.__exit__(None, None, None)
            self._current = None

    def stage(self, name: str, total: int) -> Callable[..., None]:
        """A callback ``(advance=1, status="")`` for one stage's progress (also usable as ``on_step(step, loss)``)."""
        from speechlm_eval.progress import stage

        self._close()
        if not self.enabled:
            return lambda *args, **kwargs: None
        unit = "clips" if name == "clips" else "steps"
        current = self._current = stage(name, total, unit=unit).__enter__()

        def update(step: int | None = None, loss: float | None = None, *, advance: int = 1, status: str = "") -> None:
            current.advance(advance, postfix=status or (f"loss {loss:.4f}" if loss is not None else None))

        return update

    def note(self, message: str) -> None:
        self._close()
        if self.enabled:
            logging.getLogger(__name__).info("%s", message)


def training_clips(
    world: World, spec: OrganismSpec, processor: Any, seed: int, on_progress: Callable[[int], None] | None = None
) -> tuple[ClipBank, list[MCQ]]:
    """The speech stages' clip bank (every non-eval fact, ``clips_per_fact`` random training voices each) and the
    dev questions of the stage checks (non-eval, spoken later in the held-out voice); deterministic in ``seed``."""
    rng = random.Random(seed + 100)
    train_mcqs = mcq_renderings(world.distill_facts, spec.speech.clips_per_fact)
    check_no_eval_leak(world, [m.prompt for m in train_mcqs])
    voices = [random_voice(rng) for _ in train_mcqs]
    bank = make_clip_bank(train_mcqs, voices, processor.feature_extractor, on_progress=on_progress)
    distill = mcq_renderings(world.distill_facts)
    dev_mcqs = rng.sample(distill, min(spec.dev_clips, len(distill)))
    return bank, dev_mcqs


def build_organism(config: BuildConfig) -> OrganismPaths:
    """``speechlm-eval organism build`` as a library call (espeak-ng is checked before anything is built)."""
    import shutil

    if shutil.which("espeak-ng") is None:
        raise FileNotFoundError("espeak-ng is not installed (apt-get install -y espeak-ng): the organism's speech "
                                "data needs it")
    return build(config.out, seed=config.seed, spec=micro_spec() if config.micro else OrganismSpec(),
                 progress=not config.quiet)


def build(out_dir: str | Path, seed: int = 0, spec: OrganismSpec = OrganismSpec(), progress: bool = True) -> OrganismPaths:
    """Build the organism into ``out_dir`` (see the module docstring); returns the written paths."""
    paths = paths_for(out_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {"format": ORGANISM_FORMAT, "seed": seed, "spec": _jsonable(asdict(spec))}
    with deterministic(seed, spec.threads), Reporter(progress) as report:
        clock = time.perf_counter()
        world = make_world(seed, spec.world)
        check_disjoint(world)
        items = eval_items(world)
        processor = make_processor(world, spec.vocab_size, spec.speech.chunk_seconds, seed, spec.speech.hop_length)
        tokenizer = processor.tokenizer
        distill = mcq_renderings(world.distill_facts)
        write_jsonl(mcq_rows(world.eval_mcqs), paths.eval_suite)
        write_jsonl(distill_rows(distill), paths.distill)
        timings["world"] = time.perf_counter() - clock

        text_llm, text_log = train_text_llm(world, tokenizer, items, spec.text, seed,
                                            on_step=report.stage("text LLM", spec.text.schedule.steps))
        timings["text_llm"] = text_log.seconds
        _save(text_llm, tokenizer, paths.text_llm)
        report.note(f"text LLM: {text_log.steps} steps, checks {text_log.checks[-1:]}")

        clock = time.perf_counter()
        bar = report.stage("clips", len(world.distill_facts) * spec.speech.clips_per_fact)
        bank, dev_mcqs = training_clips(world, spec, processor, seed, on_progress=lambda n: bar(advance=n))
        dev_clips = synthesize([m.prompt for m in dev_mcqs], [HELD_OUT_VOICE] * len(dev_mcqs))
        timings["clips"] = time.perf_counter() - clock
        report.note(f"clips: {len(bank)} training clips ({bank.dropped} longer than the window dropped)")

        from speechlm_eval.models.qwen2_audio import Qwen2AudioModel

        speech_llm = new_speech_llm(text_llm, tokenizer, spec.speech, seed + 2)
        adapter = Qwen2AudioModel("organism-speech-llm", speech_llm, processor)
        qa_indices = bank.spoken_qa_indices("speech")
        batcher = SpeechBatcher(bank, tokenizer, asr_template(processor), spoken_qa_template(processor), qa_indices)
        check = hearing_check(adapter, dev_clips, [m.fact.entity for m in dev_mcqs], spec.speech.stop_hearing)
        log_a = stage_a(speech_llm, batcher, spec.speech, seed + 3, check=check if spec.measure else None,
                        on_step=report.stage("stage A", spec.speech.stage_a.steps))
        report.note(f"stage A: {log_a.steps} steps, checks {log_a.checks}")
        log_b = stage_b(speech_llm, batcher, spec.speech, seed + 4, check=check if spec.measure else None,
                        on_step=report.stage("stage B", spec.speech.stage_b.steps))
        report.note(f"stage B: {log_b.steps} steps, checks {log_b.checks}")
        timings["stage_a"], timings["stage_b"] = log_a.seconds, log_b.seconds
        _save(speech_llm, processor, paths.speech_llm)

        summary.update(
            world={"entities": len(world.entities), "facts": len(world.facts), "eval_items": len(items),
                   "speech_facts": len(world.speech_facts), "distill_facts": len(world.distill_facts),
                   "training_clips": len(bank), "clips_dropped": bank.dropped},
            logs={"text_llm": text_log.to_dict(), "stage_a": log_a.to_dict(), "stage_b": log_b.to_dict()},
            sizes={"text_llm_bytes": weights_bytes(paths.text_llm),
                   "speech_llm_bytes": weights_bytes(paths.speech_llm),
                   "text_llm_parameters": sum(p.numel() for p in text_llm.parameters()),
                   "speech_llm_parameters": sum(p.numel() for p in speech_llm.parameters())},
        )  # fmt: skip
        if spec.measure:
            clock = time.perf_counter()
            from speechlm_eval.organism.measure import measure

            eval_clips = synthesize([item.text for item in items], [HELD_OUT_VOICE] * len(items))
            speech_mcqs = mcq_renderings(world.speech_facts)
            speech_clips = synthesize([m.prompt for m in speech_mcqs], [HELD_OUT_VOICE] * len(speech_mcqs))
            summary["measurements"] = measure(paths.text_llm, paths.speech_llm, items, eval_clips,
                                              speech_mcqs, speech_clips)
            timings["measure"] = time.perf_counter() - clock
        summary["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
        summary["timings_s"]["total"] = round(sum(timings.values()), 2)
    paths.summary.write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    return paths


def _save(model: torch.nn.Module, processor_or_tokenizer: Any, directory: Path) -> None:
    model.save_pretrained(directory)
    processor_or_tokenizer.save_pretrained(directory)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
