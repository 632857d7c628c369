"""The layout holds: no import climbs a floor of docs/architecture.md, the report path stays free of torch, one CLI
framework, and a model family or a benchmark is one new file plus one table row."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "speechlm_eval"


def floors() -> list[list[str]]:
    """The ```layers block of docs/architecture.md: top floor first, each a list of top-level module names."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no ```layers block"
    out = []
    for line in block.group(1).splitlines():
        if line.strip():  # "name name  description": the names, then two spaces
            out.append(re.split(r"\s{2,}", line.strip())[0].split())
    return out


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor_of(module: str, table: dict[str, int]) -> int | None:
    """The floor index of a ``speechlm_eval.*`` module (0 = top); ``__main__`` modules are entry points (top)."""
    parts = module.split(".")
    if parts[-1] == "__main__":
        return 0
    if len(parts) == 1:
        return len(table)  # the package root (its version) is below everything
    return table.get(parts[1])


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every speechlm_eval import in a file, function-level (lazy) ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append((node.lineno, target))
    return [(line, name) for line, name in found if name == "speechlm_eval" or name.startswith("speechlm_eval.")]


def package_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "shipped" not in p.parts)


def test_every_top_level_module_has_a_floor() -> None:
    table = {name: i for i, names in enumerate(floors()) for name in names}
    top_level = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in package_files()} - {"__init__"}
    assert top_level - set(table) == set(), "add these modules to the layers of docs/architecture.md"
    assert set(table) - top_level == set(), "the layers name modules that do not exist"


def test_no_import_climbs_a_floor() -> None:
    table = {name: i for i, names in enumerate(floors()) for name in names}
    climbs = []
    for path in package_files():
        here = floor_of(module_name(path), table)
        for line, target in imports_of(path):
            there = floor_of(target, table)
            if here is not None and there is not None and there < here:
                climbs.append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    assert climbs == []


def test_named_boundaries() -> None:
    def targets(folder: str) -> set[str]:
        files = [p for p in package_files() if p.relative_to(PACKAGE).parts[0].removesuffix(".py") == folder]
        return {t for p in files for _, t in imports_of(p)}

    assert not any(t.startswith("speechlm_eval.distill") for t in targets("diagnostics"))
    assert not any(t.startswith("speechlm_eval.data") for t in targets("models"))
    assert not any(t.startswith(("speechlm_eval.models", "speechlm_eval.judge")) for t in targets("scoring"))


def test_one_cli_framework() -> None:
    users = [str(p.relative_to(ROOT)) for p in package_files()
             if re.search(r"^\s*(import argparse|from argparse import)", p.read_text(encoding="utf-8"), re.M)]
    assert users == []
    assert not (PACKAGE / "cli_extra.py").exists() and (PACKAGE / "cli").is_dir()


def test_report_scoring_metrics_and_rundir_import_no_torch() -> None:
    names = [module_name(p) for p in package_files()
             if p.relative_to(PACKAGE).parts[0].removesuffix(".py") in {"report", "scoring", "metrics", "rundir"}]
    code = (f"import importlib, sys\nfor name in {names!r}:\n    importlib.import_module(name)\n"
            "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\nprint(','.join(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "", f"imported: {result.stdout.strip()}"


def test_distill_help_lists_every_option_with_its_real_default() -> None:
    import dataclasses

    from typer.testing import CliRunner

    from speechlm_eval.cli import app
    from speechlm_eval.cli.options import options_of
    from speechlm_eval.distill.config import DistillConfig, EvalConfig

    help_text = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"}).output
    flat = " ".join(help_text.split())
    for cls in (DistillConfig, EvalConfig):
        for option in options_of(cls):
            assert option.flag in help_text, option.flag
            field = next(f for f in dataclasses.fields(cls) if f.name == option.field)
            if option.default is None or option.default == []:
                continue  # no default (or one resolved later, named in its help: checked below)
            shown = option.flag[2:] if option.default is True else f"no-{option.flag[2:]}" \
                if option.default is False else str(option.default)
            assert f"[default: {shown}]" in flat, (option.flag, shown)
            assert "late" not in field.metadata
    for f in dataclasses.fields(DistillConfig):
        if f.metadata.get("late"):
            assert "default:" in f.metadata["help"] and "embedded organism:" in f.metadata["help"], f.name


TOY_FAMILY = '''
from speechlm_eval.models.base import Family, Generation


class Echo:
    name, accepts_audio, max_audio_seconds = "toy", False, None

    def generate(self, prompts, config):
        return [Generation(text=(p.text or "")[::-1], n_prompt_tokens=1, n_new_tokens=1, finish_reason="eos")
                for p in prompts]

    def describe(self):
        return {"family": "toy-echo", "id": self.name}


FAMILY = Family(name="toy-echo", load=lambda path, options: Echo(), model_types=("toy_echo",), accepts_audio=False)
'''

TOY_BENCHMARK = '''
from speechlm_eval.data.item import Item
from speechlm_eval.data.registry import Benchmark


def load(request, options):
    return [Item(id=f"toy/{i}", subset="toy_qa", text=f"Question {i}? A. yes B. no", reference="A")
            for i in range(3)]


BENCHMARK = Benchmark(name="toy", load=load, scorer={"toy_qa": "mcq"})
'''


def test_a_family_and_a_benchmark_are_one_file_and_one_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from speechlm_eval.data import registry as data_registry
    from speechlm_eval.data.suite import load_suite, parse_suite
    from speechlm_eval.models import registry as model_registry
    from speechlm_eval.models.base import GenerationConfig, Prompt

    (tmp_path / "toy_family.py").write_text(textwrap.dedent(TOY_FAMILY))
    (tmp_path / "toy_benchmark.py").write_text(textwrap.dedent(TOY_BENCHMARK))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(model_registry, "FAMILIES", model_registry.FAMILIES.copy())
    monkeypatch.setattr(data_registry, "BENCHMARKS", data_registry.BENCHMARKS.copy())

    model_registry.FAMILIES.register("toy-echo", "toy_family:FAMILY")  # the one row
    data_registry.BENCHMARKS.register("toy", "toy_benchmark:BENCHMARK")  # the one row

    model = model_registry.load_model("any/path", family="toy-echo")
    assert model.generate([Prompt(text="abc")], GenerationConfig())[0].text == "cba"
    items, sources = load_suite(parse_suite("toy:toy_qa"))
    assert [i.id for i in items] == ["toy/0", "toy/1", "toy/2"] and sources[0]["benchmark"] == "toy"
    assert data_registry.scorer_for_subset("toy_qa") == "mcq"
    assert "toy-echo" in model_registry.FAMILIES.names() and "toy" in data_registry.benchmark_names()
