"""Our model adapters as an lm-eval model named ``speechlm``: any lm-eval task scores a speech LLM's text path.

``lm_eval --model hf`` cannot score Qwen2-Audio: transformers maps ``qwen2_audio`` to ``AutoModelForSeq2SeqLM``, so
HFLM picks its encoder-decoder backend and fails on the first log-likelihood request. ``speechlm``
loads any checkpoint our registry knows (:func:`speechlm_eval.models.registry.load_model`) and hands the loaded torch
model and tokenizer to lm-eval's own ``HFLM``, so the requests are tokenised, batched and scored by exactly the code
``--model hf`` runs: on a plain text checkpoint the two give the same per-document results (tested). Audio never
enters this path; the spoken counterpart is :mod:`speechlm_eval.lmeval.spoken`.

Usage: ``import speechlm_eval.lmeval`` (it registers the model), then
``lm_eval.simple_evaluate(model="speechlm", model_args="pretrained=PATH", tasks=[...])``, or from a shell
``speechlm-eval lm-eval --model_args pretrained=PATH --tasks ...`` (lm-eval's own command line, with this model
registered; plain ``lm_eval --model speechlm`` cannot see it: lm-eval finds models only in modules that were imported
before it parses ``--model``, and it scans no plugin entry points, so it never imports speechlm_eval).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from speechlm_eval.models.base import SpeechLM
from speechlm_eval.models.registry import LoadOptions, load_model
from speechlm_eval.progress import Stage, stage


def resolve_device(device: str | None) -> str:
    """The device to load on, falling back as ``--model hf`` does: lm-eval hands every model ``cuda`` unless told
    otherwise, and on a host without CUDA that becomes the best device there is (our ``auto``) instead of a crash."""
    if device in (None, "", "auto"):
        return "auto"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("device %r requested but CUDA is not available: using auto", device)
        return "auto"
    return str(device)


class _CountingHook:
    """lm-eval's cache hook, passed through, advancing a progress stage per answered request (HFLM reports each
    answer to its hook, so this counts without touching HFLM's loops)."""

    def __init__(self, hook: Any, shown: Stage) -> None:
        self.hook, self.shown = hook, shown

    def add_partial(self, attr: str, req: Any, res: Any) -> None:
        self.shown.advance()
        self.hook.add_partial(attr, req, res)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.hook, name)


@register_model("speechlm")
class SpeechLMHarness(HFLM):
    """lm-eval's ``HFLM`` driving the torch model inside one of our adapters (its text path only).

    ``loglikelihood``, ``loglikelihood_rolling`` and ``generate_until`` are HFLM's, unchanged: for a speech LLM they
    run the language model on token ids alone (Qwen2-Audio's forward without ``input_features``).

    Args:
        pretrained: a checkpoint path / hub id, loaded with our registry, or an already loaded adapter
            (anything with ``.model`` and ``.tokenizer``, e.g. the result of ``load_model``).
        family: force a model family of our registry (``qwen2-audio``, ``hf-causal``); default: detected.
        revision, trust_remote_code: passed to ``from_pretrained``.
        dtype: ``auto`` (our default: the checkpoint's dtype on an accelerator, float32 on CPU), ``float32``,
            ``bfloat16``, ``float16``. ``--model hf``'s ``auto`` keeps the checkpoint's dtype on CPU too: pass the same
            explicit dtype to both when comparing them on CPU.
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``None``/``auto`` picks the accelerator when there is one.
        batch_size, max_batch_size, **kwargs: HFLM's own options (``max_length``, ``add_bos_token``,
            ``softmax_dtype``...); options that only apply to loading from a path (``parallelize``, ``peft``) are
            refused by HFLM.
    """

    def __init__(
        self,
        pretrained: str | SpeechLM,
        family: str | None = None,
        revision: str | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        batch_size: int | str = 1,
        max_batch_size: int | None = 64,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrained, str):
            options = LoadOptions(
                device=resolve_device(device),
                dtype=str(dtype).removeprefix("torch."),
                revision=revision,
                trust_remote_code=bool(trust_remote_code),
            )
            adapter = load_model(pretrained, options, family=family)
        else:
            adapter = pretrained
        tokenizer = adapter.tokenizer
        processor = getattr(adapter, "processor", None)
        if getattr(tokenizer, "chat_template", None) is None and getattr(processor, "chat_template", None):
            # Qwen2-Audio keeps its chat template on the processor; lm-eval's --apply_chat_template reads the
            # tokenizer's. Our adapter formats prompts through the processor, so this does not change its prompts.
            tokenizer.chat_template = processor.chat_template
        super().__init__(
            pretrained=adapter.model,
            tokenizer=tokenizer,
            backend="causal",
            revision=revision or "main",
            batch_size=batch_size,
            max_batch_size=max_batch_size,
            **kwargs,
        )
        self.adapter = adapter
        # lm-eval writes this into its results' config; the loaded object would print as a module tree.
        self.pretrained = adapter.name

    def _with_progress(self, kind: str, requests: list, run: Any) -> Any:
        hook = self.cache_hook
        with stage(f"lm-eval {kind} ({self.adapter.name})", total=len(requests), unit="requests") as shown:
            self.cache_hook = _CountingHook(hook, shown)
            try:
                return run()
            finally:
                self.cache_hook = hook

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._with_progress("loglikelihood", requests,
                                   lambda: super(SpeechLMHarness, self).loglikelihood(requests, disable_tqdm))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._with_progress("loglikelihood_rolling", requests,
                                   lambda: super(SpeechLMHarness, self).loglikelihood_rolling(requests, disable_tqdm))

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list:
        return self._with_progress("generate_until", requests,
                                   lambda: super(SpeechLMHarness, self).generate_until(requests, disable_tqdm))

    def get_model_info(self) -> dict:
        """HFLM's model info plus our adapter's identity (family, path, fingerprint, dtype, device)."""
        return {**super().get_model_info(), "speechlm_eval": self.adapter.describe()}
