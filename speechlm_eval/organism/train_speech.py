"""Stages A and B: the organism's speech LLM, a tiny ``Qwen2AudioForConditionalGeneration`` built on the text LLM.

Stage A trains the audio encoder and projector on ASR with the LM frozen (the LM already "repeats" question text, so
the projector learns to present speech the way text looks to it). Stage B unfreezes everything and mixes ASR with
spoken QA in VoiceBench's format (the user turn is the audio alone, the answer a letter) on the speech split only; the
unfrozen LM drifts, which forgets part of the never-rehearsed evaluation facts (forgetting), and the spoken path
answers only what it was trained to answer from audio (inequivalence).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.qwen2_audio import Qwen2AudioModel
from speechlm_eval.organism.clips import ClipBank
from speechlm_eval.organism.corpus import AudioPromptTemplate, collate, response_ids
from speechlm_eval.organism.evaluate import entity_heard, transcribe
from speechlm_eval.organism.loop import Schedule, StageLog, train
from speechlm_eval.organism.train_text import set_generation_defaults


@dataclass(frozen=True)
class SpeechLLMSpec:
    """Audio encoder size, clip counts and the two stages' schedules.

    The processor pads every clip to ``chunk_seconds``; the encoder's ``max_source_positions`` must equal the
    window's mel frames / 2 (``chunk_seconds * 50`` at Whisper's hop of 160 samples). A hop of 320 (50 mel frames a
    second, 12.5 audio tokens a second) halves the cost of both the encoder and the LM's audio span; the adapter
    reads the hop from the saved feature extractor, so such a checkpoint loads and runs like any other.
    """

    chunk_seconds: int = 6
    hop_length: int = 320
    encoder_layers: int = 3
    d_model: int = 128
    encoder_heads: int = 4
    encoder_ffn: int = 512
    clips_per_fact: int = 8  # training clips per non-eval fact (each a fresh MCQ rendering in a random voice)
    batch_size: int = 16
    # LR 2e-3: held-out-voice entity accuracy 35% / 100% at steps 600 / 900 (seed 0); at 3e-3 it was 4% / 15%.
    stage_a: Schedule = Schedule(steps=1200, lr=2e-3, warmup=50, check_every=300)
    stage_b: Schedule = Schedule(steps=500, lr=5e-4, warmup=30, check_every=0)
    qa_fraction: float = 0.5  # share of spoken-QA examples in a stage-B batch (the rest is ASR)
    stop_hearing: float = 0.98  # stage A stops early once dev entity accuracy reaches this (> 1 = never)
    extra: dict = field(default_factory=dict)


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's positional table, shape ``(length, channels)``: sines then cosines over geometric timescales."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def max_source_positions(spec: SpeechLLMSpec) -> int:
    """Encoder positions of one window: mel frames (16 kHz / hop) halved by the encoder's strided convolution."""
    return spec.chunk_seconds * SAMPLING_RATE // spec.hop_length // 2


def new_speech_llm(text_llm: torch.nn.Module, tokenizer: Any, spec: SpeechLLMSpec, seed: int):
    """A Qwen2-Audio whose LM (decoder and head) is an exact copy of ``text_llm``; encoder and projector random."""
    from transformers import Qwen2AudioConfig, Qwen2AudioEncoderConfig, Qwen2AudioForConditionalGeneration

    audio_config = Qwen2AudioEncoderConfig(
        num_mel_bins=80,
        encoder_layers=spec.encoder_layers,
        d_model=spec.d_model,
        encoder_attention_heads=spec.encoder_heads,
        encoder_ffn_dim=spec.encoder_ffn,
        max_source_positions=max_source_positions(spec),
    )
    config = Qwen2AudioConfig(
        audio_config=audio_config,
        text_config=text_llm.config.to_dict(),
        audio_token_index=tokenizer.convert_tokens_to_ids("<|AUDIO|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    with torch.no_grad():
        # Whisper's fixed sinusoidal positions, as in real Qwen2-Audio checkpoints; transformers leaves this frozen
        # table at a random N(0, 0.02) init, which gives the encoder almost no position signal.
        model.model.audio_tower.embed_positions.weight.copy_(sinusoids(*model.model.audio_tower.embed_positions.weight.shape))
    model.model.language_model.load_state_dict(text_llm.model.state_dict())
    model.lm_head.load_state_dict(text_llm.lm_head.state_dict())
    set_generation_defaults(model, tokenizer)
    return model.eval()


def language_model_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [*model.model.language_model.parameters(), *model.lm_head.parameters()]


def audio_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [*model.model.audio_tower.parameters(), *model.model.multi_modal_projector.parameters()]


def set_lm_frozen(model: torch.nn.Module, frozen: bool) -> None:
    for param in language_model_parameters(model):
        param.requires_grad_(not frozen)


@dataclass(frozen=True)
class SpeechBatcher:
    """Draws stage batches from a clip bank: ASR rows (transcript target) and spoken-QA rows (letter target)."""

    bank: ClipBank
    tokenizer: Any
    asr: AudioPromptTemplate
    qa: AudioPromptTemplate
    qa_indices: tuple[int, ...]  # clips whose fact may be answered from audio (the speech split)

    def asr_row(self, i: int) -> tuple[list[int], list[int]]:
        return self.asr.ids(self.bank.n_audio_tokens(i)), response_ids(self.tokenizer, self.bank.texts[i])

    def qa_row(self, i: int) -> tuple[list[int], list[int]]:
        return self.qa.ids(self.bank.n_audio_tokens(i)), response_ids(self.tokenizer, self.bank.mcqs[i].answer)

    def batches(self, batch_size: int, qa_fraction: float, seed: int) -> Callable[[int], dict[str, torch.Tensor]]:
        """``step -> batch`` with ``round(batch_size * qa_fraction)`` QA rows, the rest ASR; deterministic in seed."""
        rng = random.Random(seed)
        n_qa = round(batch_size * qa_fraction)

        def next_batch(step: int) -> dict[str, torch.Tensor]:
            asr = [rng.randrange(len(self.bank)) for _ in range(batch_size - n_qa)]
            qa = [rng.choice(self.qa_indices) for _ in range(n_qa)]
            rows = [self.asr_row(i) for i in asr] + [self.qa_row(i) for i in qa]
            batch = collate(rows, self.tokenizer.pad_token_id)
            batch.update(self.bank.batch_features(asr + qa))
            return batch

        return next_batch


def hearing_check(
    adapter: Qwen2AudioModel, clips: Sequence[np.ndarray], entities: Sequence[str], stop_at: float
) -> Callable[[int], dict[str, float]]:
    """A stage check: entity accuracy of the perception probe on dev clips (held-out voice, non-eval questions)."""

    def check(step: int) -> dict[str, float]:
        transcripts = transcribe(adapter, clips)
        accuracy = float(np.mean([entity_heard(t, e) for t, e in zip(transcripts, entities)]))
        return {"dev_entity_accuracy": accuracy, "stop": float(accuracy >= stop_at)}

    return check


def stage_a(
    model: torch.nn.Module,
    batcher: SpeechBatcher,
    spec: SpeechLLMSpec,
    seed: int,
    check: Callable[[int], dict[str, float]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> StageLog:
    """ASR only, LM frozen: trains the encoder and projector."""
    set_lm_frozen(model, True)
    try:
        return train("stage_a", model, audio_parameters(model), batcher.batches(spec.batch_size, 0.0, seed),
                     spec.stage_a, check=check, on_step=on_step)
    finally:
        set_lm_frozen(model, False)


def stage_b(
    model: torch.nn.Module,
    batcher: SpeechBatcher,
    spec: SpeechLLMSpec,
    seed: int,
    check: Callable[[int], dict[str, float]] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> StageLog:
    """Everything unfrozen: ASR mixed with spoken QA on the speech split (``spec.qa_fraction`` of each batch)."""
    set_lm_frozen(model, False)
    return train("stage_b", model, model.parameters(), batcher.batches(spec.batch_size, spec.qa_fraction, seed),
                 spec.stage_b, check=check, on_step=on_step)
