"""Granite Speech (``ibm-granite/granite-speech-3.3-8b`` and -2b): a conformer CTC encoder, a windowed Q-Former
projector and a Granite LLM, with a LoRA adapter that is active only when the input holds audio.

Prompt layout (the model card's): the Granite chat template over string contents, a system turn, and the audio
placeholder written straight before the user's text in one user turn::

    <|start_of_role|>system<|end_of_role|>Knowledge Cutoff Date: April 2024.
    Today's Date: April 9, 2025.
    You are Granite, developed by IBM. You are a helpful AI assistant<|end_of_text|>
    <|start_of_role|>user<|end_of_role|><|audio|>can you transcribe the speech into a written format?<|end_of_text|>
    <|start_of_role|>assistant<|end_of_role|>

The processor expands ``<|audio|>`` to one token per projector output (3 per 15 encoder frames: ~10 per second). The
template's own default system turn carries ``strftime_now`` (today's date), so a run would change with the day it is
run on; the model card's fixed system prompt is sent explicitly instead (:data:`SYSTEM_PROMPT`, without a final
period, as the card writes it). There is no fixed encoder window: long clips are not truncated, so none are refused.

Backbone: the language model is ``ibm-granite/granite-3.3-8b-instruct`` (2B: ``granite-3.3-2b-instruct``), kept
frozen during modality alignment; the LoRA adapter (query/value projections) is enabled for audio prompts only,
as ``GraniteSpeechForConditionalGeneration.generate`` does, so on text prompts the speech LLM is its backbone
itself (the text arms differ only by the added ``<|audio|>`` token in the vocabulary). This adapter also switches
the adapter for log-probs and teacher-forced logits, which transformers' ``forward`` leaves as it was.

The feature extractor is transformers' ``GraniteSpeechFeatureExtractor``, which needs torchaudio (its
``MelSpectrogram``) even to be constructed; :class:`GraniteSpeechMelFeatures` is that class with the same log-mel
computed with ``torch.stft`` (torchaudio's defaults: periodic Hann window, centred reflect padding, power 2, HTK mel
scale, no norm), so the real ``GraniteSpeechProcessor`` builds the inputs. The encoder has no padding mask (every
frame attends to the whole 200-frame block it sits in), so a clip's features depend on the batch's longest clip:
audio prompts run in sub-batches of equal length (:class:`~.audio_text.LengthGroupedAudio`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from speechlm_eval.models.audio_text import (AudioTextModel, AudioTextSpec, LengthGroupedAudio, audio_text_family,
                                             load_audio_text)
from speechlm_eval.models.base import LoadOptions, Prompt
from speechlm_eval.models.speech_adapter import (NO_AUTOMATIC_ADAPTER, load_speech_adapter, set_speech_adapter,
                                                 speech_adapter_loaded)

AUDIO_TOKEN = "<|audio|>"
# The model card's system prompt (granite-speech-3.3-8b, revision 3.3.2), verbatim: no period at the end.
SYSTEM_PROMPT = ("Knowledge Cutoff Date: April 2024.\nToday's Date: April 9, 2025.\n"
                 "You are Granite, developed by IBM. You are a helpful AI assistant")


class TorchMelSpectrogram(torch.nn.Module):
    """``torchaudio.transforms.MelSpectrogram(sample_rate, n_fft, win_length, hop_length, n_mels)`` with its other
    arguments at their defaults, in plain torch: ``(batch, samples)`` -> ``(batch, n_mels, frames)`` power mel."""

    def __init__(self, sample_rate: int, n_fft: int, win_length: int, hop_length: int, n_mels: int) -> None:
        super().__init__()
        from transformers.models.gemma3n.feature_extraction_gemma3n import create_fb_matrix  # torchaudio's, in numpy

        self.n_fft, self.win_length, self.hop_length = n_fft, win_length, hop_length
        self.register_buffer("window", torch.hann_window(win_length), persistent=False)
        bank = create_fb_matrix(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate, n_fft, norm=None)
        self.register_buffer("fb", torch.from_numpy(np.asarray(bank, dtype=np.float32)), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waveform, n_fft=self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window, center=True, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True).abs().pow(2.0)
        return torch.matmul(spec.transpose(-1, -2), self.fb).transpose(-1, -2)


def _feature_extractor_class():
    from transformers import GraniteSpeechFeatureExtractor
    from transformers.feature_extraction_sequence_utils import SequenceFeatureExtractor

    class GraniteSpeechMelFeatures(GraniteSpeechFeatureExtractor):
        """``GraniteSpeechFeatureExtractor`` without torchaudio: the same configuration, sizes and output
        (``input_features`` ``(batch, frames // 2, 2 * n_mels)``, ``audio_embed_sizes``, ``input_features_mask``),
        saved under the real class name so the checkpoint stays loadable by ``AutoProcessor``."""

        def __init__(self, sampling_rate: int = 16000, n_fft: int = 512, win_length: int = 400,
                     hop_length: int = 160, n_mels: int = 80, projector_window_size: int = 15,
                     projector_downsample_rate: int = 5, padding_value: float = 0.0, **kwargs: Any) -> None:
            kwargs.pop("melspec_kwargs", None)  # rebuilt from the explicit arguments, as the real class does
            feature_size = n_mels if kwargs.get("feature_size") is None else kwargs.pop("feature_size")
            SequenceFeatureExtractor.__init__(self, feature_size=feature_size, sampling_rate=sampling_rate,
                                              padding_value=padding_value, **kwargs)
            self.sampling_rate = sampling_rate
            self.melspec_kwargs = {"sample_rate": sampling_rate, "n_fft": n_fft, "win_length": win_length,
                                   "hop_length": hop_length, "n_mels": n_mels}
            self.mel_filters = TorchMelSpectrogram(**self.melspec_kwargs)
            self.projector_window_size = projector_window_size
            self.projector_downsample_rate = projector_downsample_rate

        def __call__(self, audios: Any, device: str | None = "cpu"):
            from transformers.feature_extraction_utils import BatchFeature

            batched, lengths = self._get_audios_and_audio_lengths(audios)
            sizes = self._get_num_audio_features(lengths)
            return BatchFeature(data={
                "input_features": self._extract_mel_spectrograms(batched, device=device),
                "audio_embed_sizes": sizes,
                "input_features_mask": torch.arange(max(sizes)).view(1, -1) < torch.tensor(sizes).view(-1, 1),
            })

        def _extract_mel_spectrograms(self, audio: torch.Tensor, device: str | None = "cpu") -> torch.Tensor:
            # GraniteSpeechFeatureExtractor._extract_mel_spectrograms, line for line, on TorchMelSpectrogram.
            melspec = self.mel_filters.to(device) if device is not None else self.mel_filters
            audio = audio.to(device) if device is not None else audio
            bsz = audio.shape[0]
            with torch.no_grad():
                mel = melspec(audio.float())
                logmel = mel.transpose(-1, -2).clip_(min=1e-10).log10_()
                mx = logmel.amax(dim=(-2, -1), keepdim=True)
                logmel = torch.maximum(logmel, mx - 8.0).div_(4).add_(1)
                if logmel.shape[1] % 2 == 1:
                    logmel = logmel[:, :-1]
                return logmel.reshape(bsz, -1, 2 * logmel.shape[-1])

        def to_dict(self) -> dict[str, Any]:
            out = super().to_dict()
            out["feature_extractor_type"] = "GraniteSpeechFeatureExtractor"
            return out

    return GraniteSpeechMelFeatures


def mel_features(**config: Any) -> Any:
    """A :class:`GraniteSpeechMelFeatures` (``GraniteSpeechFeatureExtractor``'s arguments)."""
    return _feature_extractor_class()(**config)


def _audio_tokens(n_samples: int, processor: Any) -> int:
    return int(processor.audio_processor._get_num_audio_features([n_samples])[0])


SPEC = AudioTextSpec(
    family="granite-speech",
    model_types=("granite_speech",),
    model_class="GraniteSpeechForConditionalGeneration",
    system_prompt=SYSTEM_PROMPT,
    audio_tokens=_audio_tokens,
    min_audio_tokens=1,
    # The LM's attention projections (q/k/v/o_proj exist only there: the encoder has to_q/to_kv, the Q-Former
    # query/key/value).
    lora_targets=r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    extras={"backbone": "ibm-granite/granite-3.3-8b-instruct (2B: ibm-granite/granite-3.3-2b-instruct)",
            "notes": "LLM frozen, the checkpoint's LoRA adapter on for audio prompts only: on text the speech LLM is "
                     "its backbone; no fixed audio window; fixed model-card system prompt (the template's default "
                     "carries today's date)"},
)


class GraniteSpeechModel(LengthGroupedAudio, AudioTextModel):
    """A Granite Speech checkpoint: string-content conversations, and the audio-only adapter switched per batch."""

    speech_adapter_folder = ""  # the audio-only adapter's files sit beside the weights (a saved copy writes them there)

    def conversation(self, prompt: Prompt) -> list[dict[str, Any]]:
        """System turn (the card's unless ``prompt.system``), then one user turn ``<|audio|>`` + text."""
        system = prompt.system if prompt.system is not None else self.spec.system_prompt
        user = (AUDIO_TOKEN if prompt.audio is not None else "") + (prompt.text or "")
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def chat_text(self, prompt: Prompt) -> str:
        return self.tokenizer.apply_chat_template(self.conversation(prompt), add_generation_prompt=True,
                                                  tokenize=False)

    def encode(self, prompts: Sequence[Prompt]):
        set_speech_adapter(self.model, active=any(p.audio is not None for p in prompts))
        return super().encode(prompts)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "speech_adapter": speech_adapter_loaded(self.model)}


def load_processor(name_or_path: str, options: LoadOptions) -> Any:
    """``GraniteSpeechProcessor`` from the checkpoint's tokenizer and feature-extractor config, with
    :class:`GraniteSpeechMelFeatures` as its audio processor."""
    from transformers import AutoTokenizer, GraniteSpeechFeatureExtractor, GraniteSpeechProcessor

    common = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **common)
    config, _ = GraniteSpeechFeatureExtractor.get_feature_extractor_dict(name_or_path, revision=options.revision)
    keep = ("sampling_rate", "projector_window_size", "projector_downsample_rate", "padding_value")
    arguments = {k: config[k] for k in keep if k in config}
    melspec = config.get("melspec_kwargs") or {}
    arguments.update({k: melspec[k] for k in ("n_fft", "win_length", "hop_length", "n_mels") if k in melspec})
    return GraniteSpeechProcessor(audio_processor=mel_features(**arguments), tokenizer=tokenizer)


def load(name_or_path: str, options: LoadOptions) -> GraniteSpeechModel:
    """The base weights, then the checkpoint's adapter (beside them, as on the hub) with peft, switched off."""
    processor = load_processor(name_or_path, options)
    model = load_audio_text(name_or_path, options, SPEC, processor=processor,
                            model_kwargs={"adapter_kwargs": NO_AUTOMATIC_ADAPTER}).model
    if load_speech_adapter(model, name_or_path, options):
        model.to(next(model.parameters()).device)
    return GraniteSpeechModel(name_or_path, model, processor, SPEC, revision=options.revision)


FAMILY = audio_text_family(SPEC, load)
