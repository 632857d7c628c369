"""Benchmark data: Items, audio decoding, the benchmark registry (VoiceBench, MMAU, bundled) and suite loading."""
