"""Voxtral (Mistral; ``mistralai/Voxtral-Mini-3B-2507``, ``mistralai/Voxtral-Small-24B-2507``): a Whisper-style audio
encoder, a projector that stacks 4 encoder frames into one audio token, and a Mistral language model, through
transformers' ``VoxtralProcessor``.

Its tokenizer is Mistral's own (``tekken.json`` read by ``mistral-common``, transformers' ``MistralCommonBackend``):
there is no Jinja chat template, and the prompt is built by mistral-common's request encoding, audio included, so
text prompts are encoded the same way as audio ones (``processor.apply_chat_template(..., tokenize=True)``), never
by tokenising a rendered string (a plain string's ``[INST]`` would be read as text, not as the control token). The
layout::

    <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST][BEGIN_AUDIO][AUDIO]x375 per 30 s...question[/INST]

The audio is sent as a base64 WAV (float32, 16 kHz: lossless); mistral-common pads it to a whole number of 30 s
windows and gives 12.5 audio tokens a second of window (375 a window); the processor cuts the features into 30 s
encoder windows. Voxtral's tokenizer (tekken v7 for the 2507 releases) refuses a system prompt in a conversation that
holds audio, so such prompts are refused here with that reason (an error record), and the family sends none by
default. Clips up to 40 minutes, the model card's limit for audio understanding, are taken.

Backbone: Voxtral Mini 3B is built on Ministral 3B, whose weights are not public; Voxtral Small 24B on Mistral Small
3.1 24B (``mistralai/Mistral-Small-3.1-24B-Instruct-2503``). Needs ``mistral-common`` (``pip install
'speechlm-eval[voxtral]'``). Distillation matches its tokens to the teacher's by bytes (mistral-common's byte tokens have no
one-to-one strings: :func:`speechlm_eval.distill.vocab.token_keys`).
"""

from __future__ import annotations

import base64
import io
import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
import soundfile as sf
import torch

from speechlm_eval.audio_format import SAMPLING_RATE
from speechlm_eval.models.audio_text import AudioTextModel, AudioTextSpec, audio_text_family, load_audio_text
from speechlm_eval.models.base import LoadOptions, ModelInputError, ModelLoadError, Prompt

WINDOW_SECONDS = 30.0  # mistral-common's chunk_length_s for Voxtral: audio is padded to whole windows
MAX_AUDIO_SECONDS = 40 * 60.0  # the model card: up to 40 minutes of audio for understanding


def audio_token_count(n_samples: int, processor: Any) -> int:
    """Audio tokens mistral-common gives a clip: its frame rate (12.5/s) times the clip padded to whole 30 s windows."""
    audio = processor.tokenizer.tokenizer.instruct_tokenizer.audio_encoder.audio_config
    window = audio.chunk_length_s or WINDOW_SECONDS
    windows = max(1, math.ceil(n_samples / (SAMPLING_RATE * window)))
    return int(round(windows * window * audio.frame_rate))


def wav_base64(audio: np.ndarray) -> str:
    """A clip as mistral-common takes it: a base64 WAV, float32 at 16 kHz (no requantisation)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(audio, dtype=np.float32), SAMPLING_RATE, format="WAV", subtype="FLOAT")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def messages(prompt: Prompt) -> list[dict[str, Any]]:
    """The request's messages: the system turn (text prompts only), then the user turn, audio before text."""
    if prompt.audio is not None and prompt.system is not None:
        raise ModelInputError("Voxtral's tokenizer takes no system prompt in a conversation with audio (tekken "
                              "before v13); run with --system-prompt none")
    content: list[dict[str, Any]] = []
    if prompt.audio is not None:
        content.append({"type": "audio", "base64": wav_base64(prompt.audio)})
    if prompt.text is not None:
        content.append({"type": "text", "text": prompt.text})
    turns: list[dict[str, Any]] = [{"role": "system", "content": prompt.system}] if prompt.system is not None else []
    user = content[0]["text"] if len(content) == 1 and prompt.audio is None else content
    return turns + [{"role": "user", "content": user}]


SPEC = AudioTextSpec(
    family="voxtral",
    model_types=("voxtral",),
    model_class="VoxtralForConditionalGeneration",
    system_prompt=None,
    audio_tokens=audio_token_count,
    min_audio_tokens=1,
    max_audio_seconds=lambda _processor: MAX_AUDIO_SECONDS,
    extras={"backbone": "mistralai/Mistral-Small-3.1-24B-Instruct-2503 (for Voxtral-Small-24B-2507; Voxtral-Mini's "
                        "Ministral 3B is not public)",
            "notes": "Mistral's tokenizer (mistral-common, no chat template); no system prompt with audio; 375 audio "
                     "tokens per started 30 s window; needs pip install 'speechlm-eval[voxtral]'"},
    reuses_prompt_cache=True,
)


class VoxtralModel(AudioTextModel):
    """A Voxtral checkpoint: prompts encoded by mistral-common's request encoding, text and audio alike."""

    system_with_audio = False  # tekken before v13 refuses it: distillation puts the system text in the user turn

    def __init__(self, name: str, model: torch.nn.Module, processor: Any, revision: str | None = None) -> None:
        super().__init__(name, model, processor, SPEC, revision=revision)

    def conversation(self, prompt: Prompt) -> list[dict[str, Any]]:
        return messages(prompt)

    def chat_text(self, prompt: Prompt) -> str:
        """The prompt as text (for display and the system-prompt policy): mistral-common's encoding decoded with its
        control tokens, a clip's run of ``[AUDIO]`` tokens shown as one."""
        text = self.tokenizer.decode(self._token_ids(prompt), skip_special_tokens=False)
        return re.sub(r"(\[AUDIO\])+", "[AUDIO]", text)

    def _token_ids(self, prompt: Prompt) -> list[int]:
        encoded = self.tokenizer.apply_chat_template([messages(prompt)], tokenize=True)
        rows = encoded["input_ids"] if isinstance(encoded, Mapping) else encoded
        return [int(i) for i in rows[0]]

    def encode(self, prompts: Sequence[Prompt]) -> Mapping[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask`` ``(batch, len)``; for audio prompts also ``input_features``
        ``(n_windows, 128, 3000)``, every clip cut into 30 s windows (batch-wide, in prompt order)."""
        with_audio = [p.audio is not None for p in prompts]
        if any(with_audio) and not all(with_audio):
            raise ValueError("a batch must be all-audio or all-text prompts")
        for prompt in prompts:
            self.check_audio(prompt.audio)
        encoded = self.processor.apply_chat_template([messages(p) for p in prompts], tokenize=True,
                                                     return_dict=True, return_tensors="pt")
        return {k: v for k, v in encoded.items() if isinstance(v, torch.Tensor)}

    def prompt_length(self, prompt: Prompt) -> int:
        return len(self._token_ids(prompt))

    def default_system_prompt(self) -> str | None:
        return None  # mistral-common adds no system turn of its own


def load(name_or_path: str, options: LoadOptions) -> VoxtralModel:
    import importlib.util

    if importlib.util.find_spec("mistral_common") is None:
        raise ModelLoadError(f"{name_or_path!r} is a Voxtral checkpoint: its tokenizer needs mistral-common "
                             "(pip install 'speechlm-eval[voxtral]')")
    loaded = load_audio_text(name_or_path, options, SPEC)
    return VoxtralModel(name_or_path, loaded.model, loaded.processor, revision=options.revision)


FAMILY = audio_text_family(SPEC, load)
