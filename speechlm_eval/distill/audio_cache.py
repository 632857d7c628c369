"""The frozen audio encoder's per-clip output cache of a distillation run: :class:`~speechlm_eval.models.encoder_cache.EncoderCache`
(it lives on the models floor, where ``gap`` reuses it across its arms and diagnostics)."""

from speechlm_eval.models.encoder_cache import CacheStats, EncoderCache

__all__ = ["CacheStats", "EncoderCache"]
