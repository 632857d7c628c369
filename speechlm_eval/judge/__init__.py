"""LLM judges for VoiceBench's judge-scored subsets: backends (OpenAI-compatible HTTP, a local model), an on-disk
cache, and judging a run directory. Scorers never call a judge: they read outputs attached to the item
(:mod:`speechlm_eval.scoring.judged`)."""
