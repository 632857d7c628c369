"""A gap run in other tools' formats, from its files alone: VoiceBench's output files, a VoiceBench leaderboard row,
MMAU's prediction JSON and lm-eval-style results, so the run can be re-scored, submitted or compared elsewhere.

- ``voicebench``: one ``{model}-{data}-{split}-{modality}.jsonl`` per VoiceBench subset, split and arm, as VoiceBench's
  ``main.py`` writes them (the dataset's columns without the audio, plus ``response``); modality ``audio`` for the
  speech arm, ``text`` for the text arms. Judge-scored subsets also get api_judge.py's ``result-`` file (``score`` =
  the judge outputs) when the run was judged. Each row carries a ``speechlm_eval`` key (item id and arm) that
  ``speechlm-eval score voicebench`` reads so its seeded fallback draws are the run's; VoiceBench ignores it.
- ``voicebench-row``: the leaderboard's row per arm (open-ended columns on the 1–5 judge scale, the rest in %), as a
  Markdown table line for an issue submission and as JSON.
- ``mmau``: MMAU's benchmark list with each prediction under ``model_output`` (``evaluation.py --input``).
- ``lm-eval``: per arm, a ``results_<arm>.json`` shaped like lm-eval's (``results``/``n-samples``/``config``) and a
  ``samples_<subset>_<arm>.jsonl`` per subset like ``--log_samples`` (doc, target, response, metrics together).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping

from speechlm_eval.metrics.overall import LEADERBOARD_COLUMNS
from speechlm_eval.records import dumps, json_safe, write_json_atomic, write_text_atomic
from speechlm_eval.rundir import ARM_BY_NAME, ARMS, SPEECH_ARM, ItemRow, RunDir

Format = Literal["voicebench", "voicebench-row", "mmau", "lm-eval"]
FORMATS: tuple[str, ...] = ("voicebench", "voicebench-row", "mmau", "lm-eval")
ROW_KEY = "speechlm_eval"  # per-row provenance in exported VoiceBench files: {"id", "arm"}
OPEN_COLUMNS = ("AlpacaEval", "CommonEval", "WildVoice")  # on the leaderboard's 1-5 scale, not x20
_INTERNAL_META = {"split", "key_phrase", "entity", "attribute", "value", "world_seed"}


class ExportError(ValueError):
    """A run that cannot be exported in the asked format (nothing of that benchmark in it, no results yet)."""


@dataclass
class ExportConfig:
    """``speechlm-eval export``: which run, which format, where."""

    run_dir: Path = field(metadata={"argument": True, "help": "A gap run directory (with its report built)."})
    format: str = field(default="voicebench", metadata={
        "help": "voicebench ({model}-{data}-{split}-{modality}.jsonl per subset and arm), voicebench-row (the "
                "leaderboard row), mmau (prediction JSON for evaluation.py) or lm-eval (results + samples)."})
    out: Path | None = field(default=None, metadata={"help": "Output folder (default: RUN_DIR/export/FORMAT)."})
    model_name: str | None = field(default=None, metadata={
        "help": "Model name in file names and rows (default: the speech LLM's checkpoint name)."})
    push_to_hub: str | None = field(default=None, metadata={
        "help": "Also upload the export, the run's results and per-item scores and a dataset card to this Hugging "
                "Face dataset repo (needs huggingface_hub and a token; not exercised by the test suite)."})


def model_names(run: RunDir, override: str | None) -> dict[str, str]:
    """The name of each arm's model in file names: the checkpoint folder or hub name, made file-safe."""
    models = run.read_manifest().models

    def name(role: str) -> str:
        raw = str((models.get(role) or {}).get("id") or role)
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw.rstrip("/").split("/")[-1]) or role

    speech = override or name("speech_llm")
    return {arm: speech if ARM_BY_NAME[arm].model == "speech_llm" else name("text_llm") for arm in ARMS}


def _source_row(item: ItemRow) -> dict[str, Any]:
    """The dataset row VoiceBench's files repeat: its columns (kept in the item's meta) without the audio."""
    row = {k: v for k, v in item.meta.items() if k not in _INTERNAL_META}
    row["prompt"] = item.text
    if item.reference is not None:
        row["reference"] = item.reference
    return row


def _by_split(items: Iterable[ItemRow]) -> dict[str, list[ItemRow]]:
    out: dict[str, list[ItemRow]] = {}
    for item in items:
        out.setdefault(str(item.meta.get("split", "test")), []).append(item)
    return out


def export_voicebench(run: RunDir, out: Path, model_override: str | None = None) -> list[Path]:
    """VoiceBench output files of every VoiceBench subset in the run; item errors are left out (and counted)."""
    from speechlm_eval.data.voicebench import SUBSETS

    names = model_names(run, model_override)
    records = run.arm_records()
    judged = run.judgements()
    written, skipped = [], 0
    grouped: dict[str, list[ItemRow]] = {}
    for item in run.items(with_judgements=False):
        if item.subset in SUBSETS:
            grouped.setdefault(item.subset, []).append(item)
    if not grouped:
        raise ExportError(f"{run.path}: no VoiceBench subset in this run (subsets: "
                          f"{', '.join(sorted({i.subset for i in run.items(with_judgements=False)}))})")
    for subset, items in grouped.items():
        for split, split_items in _by_split(items).items():
            for arm, arm_records in records.items():
                rows, results = [], []
                for item in split_items:
                    record = arm_records.get(item.id)
                    if record is None or record.get("error") is not None:
                        skipped += record is not None
                        continue
                    row = {**_source_row(item), "response": record["response"], ROW_KEY: {"id": item.id, "arm": arm}}
                    rows.append(row)
                    outputs = _judge_outputs(judged.get(item.id, []), record["response"])
                    if outputs is not None:
                        results.append({**row, "score": outputs})
                if not rows:
                    continue
                modality = "audio" if ARM_BY_NAME[arm].audio else "text"
                stem = f"{names[arm]}-{subset}-{split}-{modality}.jsonl"
                written.append(_write_jsonl(out / stem, rows))
                if results:
                    written.append(_write_jsonl(out / f"result-{stem}", results))
    if skipped:
        write_text_atomic(out / "SKIPPED.txt", f"{skipped} error records were left out of the exported files.\n")
    return written


def _judge_outputs(rows: list[Mapping[str, Any]], response: str) -> list[str] | None:
    from speechlm_eval.scoring.judged import response_key

    key = response_key(response)
    return next((list(r["outputs"]) for r in rows if r.get("response_sha256") == key), None)


def _write_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    write_text_atomic(path, "".join(dumps(json_safe(dict(r))) + "\n" for r in rows))
    return path


def leaderboard_rows(results: Mapping[str, Any], names: Mapping[str, str]) -> list[dict[str, Any]]:
    """One leaderboard row per arm: the nine columns as the leaderboard prints them (open-ended on 1–5, the rest on
    0–100), and Overall only when all nine are present."""
    rows = []
    for arm, entry in (results.get("overall") or {}).get("arms", {}).items():
        columns = {}
        for column, value in entry["columns"].items():
            columns[column] = None if value is None else (value / 20.0 if column in OPEN_COLUMNS else value)
        rows.append({"model": names.get(arm, arm), "arm": arm, **columns, "Overall": entry.get("overall"),
                     "missing": list(entry.get("missing", []))})
    return rows


def export_leaderboard_row(run: RunDir, out: Path, model_override: str | None = None) -> list[Path]:
    rows = leaderboard_rows(run.read_results(), model_names(run, model_override))
    if not rows:
        raise ExportError(f"{run.path}: no VoiceBench leaderboard subset in this run")
    header = ["Model", *LEADERBOARD_COLUMNS, "Overall"]

    def cell(value: Any, column: str) -> str:
        return "–" if value is None else f"{value:.2f}"

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        label = row["model"] if row["arm"] == SPEECH_ARM else f"{row['model']} ({row['arm']})"
        lines.append("| " + " | ".join([label, *(cell(row[c], c) for c in LEADERBOARD_COLUMNS),
                                        cell(row["Overall"], "Overall")]) + " |")
    note = ("\nThe leaderboard's row is the speech arm (spoken input); AlpacaEval, CommonEval and WildVoice are GPT "
            "scores on 1–5, the rest in %. Overall is computed only when all nine columns are present.\n")
    return [_text(out / "leaderboard-row.md", "\n".join(lines) + "\n" + note),
            _json(out / "leaderboard-row.json", rows)]


def _text(path: Path, text: str) -> Path:
    write_text_atomic(path, text)
    return path


def _json(path: Path, obj: Any) -> Path:
    write_json_atomic(path, obj)
    return path


def export_mmau(run: RunDir, out: Path, model_override: str | None = None) -> list[Path]:
    """MMAU's benchmark list (the fields evaluation.py reads) with the speech arm's answer as ``model_output``."""
    speech = run.records(SPEECH_ARM)
    rows = []
    for item in run.items(with_judgements=False):
        if item.scorer != "mmau":
            continue
        meta = item.meta
        row = {"id": item.id, "audio_id": meta.get("audio_id"), "question": meta.get("question"), "choices": list(item.choices),
               "answer": item.reference, "dataset": meta.get("dataset"), "task": meta.get("task"),
               "split": meta.get("split"), "category": meta.get("category_raw", meta.get("category")),
               "sub-category": meta.get("sub-category"), "difficulty": meta.get("difficulty")}
        record = speech.get(item.id)
        if record is not None and record.get("error") is None:
            row["model_output"] = record["response"]  # no key at all for errors: evaluation.py skips the item
        rows.append(row)
    if not rows:
        raise ExportError(f"{run.path}: no MMAU items in this run")
    name = model_names(run, model_override)[SPEECH_ARM]
    return [_json(out / f"{name}-mmau-test-mini.json", rows)]


def export_lmeval(run: RunDir, out: Path, model_override: str | None = None) -> list[Path]:
    """lm-eval-shaped results per arm (``results_<arm>.json``) and per-document samples per subset and arm."""
    results = run.read_results()
    names = model_names(run, model_override)
    scores = run.scores()
    written = []
    arms = sorted({a for e in results.get("subsets", {}).values() for a in e.get("arms", {}) if a in ARMS},
                  key=ARMS.index)
    for arm in arms:
        task_results, n_samples = {}, {}
        for subset, entry in results.get("subsets", {}).items():
            a = (entry.get("arms") or {}).get(arm)
            if not a or a.get("score") is None:
                continue
            metric = entry.get("metric", "score")
            half_width = (a["ci_high"] - a["ci_low"]) / 2 if a.get("ci_low") is not None else None
            task_results[subset] = {"alias": subset, f"{metric},none": a["score"],
                                    # lm-eval's stderr; here the bootstrap CI's half width / 1.96
                                    f"{metric}_stderr,none": None if half_width is None else half_width / 1.96}
            n_samples[subset] = {"original": entry.get("n"), "effective": a.get("n")}
            samples = [_sample(row, arm, metric) for row in scores if row["subset"] == subset and arm in row["arms"]]
            written.append(_write_jsonl(out / f"samples_{subset}_{arm}.jsonl", samples))
        manifest = results.get("manifest", {})
        document = {"results": task_results, "n-samples": n_samples,
                    "config": {"model": "speechlm", "model_args": f"pretrained={names[arm]}", "arm": arm,
                               "generation": manifest.get("generation"), "seed": manifest.get("seed")},
                    "versions": {s: "speechlm-eval" for s in task_results},
                    "speechlm_eval": {"arm": arm, "run": str(run.path), "confidence_interval": "paired bootstrap"}}
        written.append(_json(out / f"results_{arm}.json", json_safe(document)))
    if not written:
        raise ExportError(f"{run.path}: no scored subset to export")
    return written


def _sample(row: Mapping[str, Any], arm: str, metric: str) -> dict[str, Any]:
    entry = row["arms"][arm]
    value = entry.get("score")
    return {"doc_id": row["id"], "doc": {"prompt": row.get("text") or row.get("audio_instruction"),
                                         "choices": row.get("choices"), "reference": row.get("reference")},
            "target": row.get("reference"), "arguments": None, "resps": [[entry.get("response")]],
            "filtered_resps": [entry.get("extracted")], "filter": "none", "metrics": [metric],
            metric: None if value is None or (isinstance(value, float) and math.isnan(value)) else value,
            "parsed": entry.get("parsed"), "error": entry.get("error")}


EXPORTERS = {"voicebench": export_voicebench, "voicebench-row": export_leaderboard_row, "mmau": export_mmau,
             "lm-eval": export_lmeval}


def export_run(config: ExportConfig) -> list[Path]:
    """Write the export; returns the files written. :class:`ExportError` for a run or format that cannot be used."""
    run = RunDir(config.run_dir)
    if not run.manifest_path.exists():
        raise ExportError(f"{config.run_dir} is not a run directory (no manifest.json)")
    if config.format not in EXPORTERS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {config.format!r}")
    if not run.results_path.exists():
        raise ExportError(f"{config.run_dir} has no results.json: build it with `speechlm-eval report {config.run_dir}`")
    out = Path(config.out) if config.out is not None else run.path / "export" / config.format
    out.mkdir(parents=True, exist_ok=True)
    written = EXPORTERS[config.format](run, out, config.model_name)
    if config.push_to_hub:
        push_to_hub(run, out, config.push_to_hub)
    return written


def dataset_card(run: RunDir) -> str:
    """A short README for the hub: what the run is, its models, and the scores-and-gaps table."""
    from speechlm_eval.report.markdown import render_markdown

    return ("---\ntags:\n- speechlm-eval\n- speech-llm-evaluation\n---\n\n"
            + render_markdown(run.read_results()).replace("# speechlm-eval gap report", "# speechlm-eval run", 1))


def push_to_hub(run: RunDir, export_dir: Path, repo: str) -> None:
    """Upload the export, results.json, scores.jsonl, manifest.json and a dataset card to a dataset repo (needs the
    network and a token: not run by the test suite)."""
    import tempfile

    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ExportError("--push-to-hub needs huggingface_hub: pip install huggingface_hub") from None
    api = HfApi()
    api.create_repo(repo, repo_type="dataset", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        card = Path(tmp) / "README.md"
        card.write_text(dataset_card(run), encoding="utf-8")
        api.upload_file(path_or_fileobj=str(card), path_in_repo="README.md", repo_id=repo, repo_type="dataset")
    for path in (run.results_path, run.scores_path, run.manifest_path):
        if path.exists():
            api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo, repo_type="dataset")
    api.upload_folder(folder_path=str(export_dir), path_in_repo=f"export/{export_dir.name}", repo_id=repo,
                      repo_type="dataset")
