"""speechlm-eval: measure what a speech LLM lost when it learned to listen, and repair it."""

__version__ = "0.1.0"
