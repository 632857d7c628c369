"""Loader of the local test tasks: lm-eval resolves relative ``data_files`` against the current directory, not the
YAML's, so the path is built here from this file's location."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATA = Path(__file__).resolve().parent / "questions.jsonl"


def load(**_metadata: Any):
    """The tasks' dataset: ``{"test": Dataset}`` (lm-eval passes the task metadata as keyword arguments)."""
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]
    return DatasetDict({"test": Dataset.from_list(rows)})
