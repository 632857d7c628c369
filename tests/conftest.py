"""Shared fixtures: tiny offline models (built once per session) and a hermetic cache directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.served import LocalServer, organism_server
from tests.fixtures.tiny_models import build_pair


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the TTS / embedded-model cache at a session temp dir, and keep transformers off the network."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["SPEECHLM_EVAL_CACHE"] = str(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return root


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests: the two cores are shared with other test runs, and in-process runs then
    match subprocess runs (``OMP_NUM_THREADS=1``) bit for bit. Use with ``pytestmark = usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(speech_llm_dir, text_llm_dir): the student's LM is the text model plus small noise."""
    return build_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_identical_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pair whose student LM equals the text model exactly (no noise)."""
    return build_pair(tmp_path_factory.mktemp("tiny0"), student_noise=0.0)


@pytest.fixture(scope="session")
def organism_text_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real ``transformers serve`` of the shipped organism text LLM on 127.0.0.1 (shared by the served tests; skips
    without the serving extra)."""
    yield from organism_server("text", tmp_path_factory)


@pytest.fixture(scope="session")
def organism_speech_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A real ``transformers serve`` of the shipped organism speech LLM (Qwen2-Audio, takes input_audio)."""
    yield from organism_server("speech", tmp_path_factory)
