"""The distillation experiment's no-KD control: continue the organism's speech training (stage B) for more steps.

Stage B's recipe (LM unfrozen, half ASR and half spoken QA with gold letters on the speech split, its learning rate)
resumed from the built speech LLM, on the same clip bank the build made (regenerated from the seed). It answers
"does the same amount of further training without a teacher do as well as distillation?".
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from speechlm_eval.organism.builder import OrganismSpec, deterministic, training_clips
from speechlm_eval.organism.layout import paths_for
from speechlm_eval.organism.corpus import asr_template, spoken_qa_template
from speechlm_eval.organism.train_speech import SpeechBatcher, stage_b
from speechlm_eval.data.organism_world import make_world


def continue_speech_training(build_dir: str | Path, out: str | Path, steps: int, spec: OrganismSpec = OrganismSpec()) -> Path:
    """Train the build's speech LLM ``steps`` more stage-B steps (constant schedule shape: warm-up then cosine at
    stage B's peak LR) and save it, with its processor, to ``out``; returns ``out``. Deterministic in the build's seed.
    """
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    paths = paths_for(build_dir)
    seed = int(json.loads(paths.summary.read_text())["seed"])
    out = Path(out)
    with deterministic(seed + 50, spec.threads):
        world = make_world(seed, spec.world)
        processor = AutoProcessor.from_pretrained(paths.speech_llm)
        # The bank depends only on the world, the (saved) feature extractor and the seed: rebuilt as the build made it.
        bank, _ = training_clips(world, spec, processor, seed)
        model = Qwen2AudioForConditionalGeneration.from_pretrained(paths.speech_llm, dtype=torch.float32)
        qa_indices = bank.spoken_qa_indices("speech")
        batcher = SpeechBatcher(bank, processor.tokenizer, asr_template(processor), spoken_qa_template(processor),
                                qa_indices)
        schedule = replace(spec.speech.stage_b, steps=steps, check_every=0)
        log = stage_b(model, batcher, replace(spec.speech, stage_b=schedule), seed + 51)
        model.save_pretrained(out)
        processor.save_pretrained(out)
    (out / "continued_training.json").write_text(json.dumps(log.to_dict(), indent=1) + "\n")
    return out
