"""Shared fixtures: tiny offline models (built once per session) and a hermetic cache directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.fixtures.tiny_models import build_pair


@pytest.fixture(scope="session", autouse=True)
def hermetic_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Point the TTS / embedded-model cache at a session temp dir, and keep transformers off the network."""
    root = tmp_path_factory.mktemp("cache")
    os.environ["SPEECHLM_EVAL_CACHE"] = str(root)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    return root


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(speech_llm_dir, text_llm_dir): the student's LM is the text model plus small noise."""
    return build_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_identical_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A pair whose student LM equals the text model exactly (no noise)."""
    return build_pair(tmp_path_factory.mktemp("tiny0"), student_noise=0.0)
