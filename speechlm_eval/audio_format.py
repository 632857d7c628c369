"""The one audio format exchanged between the parts of speechlm-eval: mono float32 samples in [-1, 1], shape
``(n_samples,)``, at :data:`SAMPLING_RATE`, what the speech LLMs' feature extractors expect."""

SAMPLING_RATE = 16_000
