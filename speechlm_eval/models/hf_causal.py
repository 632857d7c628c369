"""Any transformers causal LM as a text-only model (the text LLM / teacher), prompted through its chat template."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from speechlm_eval.models.base import Family, LoadOptions, ModelInputError, Prompt
from speechlm_eval.models.hf_runtime import HFAdapter, attention_kwargs, eos_token_ids, resolve_device, resolve_dtype


class CausalLMModel(HFAdapter):
    """A text-only checkpoint behind the SpeechLM interface (``accepts_audio`` is False)."""

    family = "hf-causal"
    accepts_audio = False
    max_audio_seconds = None

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, revision: str | None = None) -> None:
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.revision = revision
        self.prompt_format = "chat-template" if tokenizer.chat_template else "raw"
        self._eos_ids = eos_token_ids(model, tokenizer)

    def chat_text(self, prompt: Prompt) -> str:
        if prompt.audio is not None:
            raise ModelInputError(f"{self.name} is a text-only model and cannot take audio")
        if self.prompt_format == "raw":
            # A base model without a chat template reads the query as is.
            return prompt.text or ""
        messages: list[dict[str, str]] = []
        if prompt.system is not None:
            messages.append({"role": "system", "content": prompt.system})
        messages.append({"role": "user", "content": prompt.text or ""})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        texts = [self.chat_text(p) for p in prompts]
        # The chat text already holds every special token; adding BOS again would change the prompt.
        return dict(self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))

    def prompt_length(self, prompt: Prompt) -> int:
        return len(self.tokenizer(self.chat_text(prompt), add_special_tokens=False)["input_ids"])

    def describe(self) -> dict:
        return self.describe_with(prompt_format=self.prompt_format)

    def language_model(self) -> torch.nn.Module:
        return self.model.get_decoder()

    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()


def load(name_or_path: str, options: LoadOptions) -> CausalLMModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(options.device)
    tokenizer = AutoTokenizer.from_pretrained(
        name_or_path, revision=options.revision, trust_remote_code=options.trust_remote_code
    )
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path,
        revision=options.revision,
        dtype=resolve_dtype(options.dtype, device),
        trust_remote_code=options.trust_remote_code,
        **attention_kwargs(options),
    )
    model.to(device).eval()
    return CausalLMModel(name_or_path, model, tokenizer, revision=options.revision)


FAMILY = Family(name="hf-causal", load=load, model_types=(), accepts_audio=False,
                notes="any transformers causal LM: a text LLM (the forgetting reference or the distillation teacher)")
