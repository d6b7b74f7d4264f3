"""Every module a DVC stage imports is one of its deps (dvc.yaml and toy/dvc.yaml), traced statically.

The trace follows every ``import`` of ``regionroute``/``stages`` modules, including the ones inside
functions (lazy imports), except under ``if TYPE_CHECKING:``, and the packages they live in.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from regionroute.fingerprint import stage_code_files

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = ("dvc.yaml", "toy/dvc.yaml")


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    for candidate in (path / "__init__.py", path.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Dotted names of the project modules ``path`` imports, with their parent packages."""
    tree = ast.parse(path.read_text())
    hidden = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for n in ast.walk(node)}  # fmt: skip
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    ours = {n for n in names if n.split(".")[0] in ("regionroute", "stages")}
    return {".".join(n.split(".")[:i]) for n in ours for i in range(1, n.count(".") + 2)}


def imported_files(script: Path) -> set[Path]:
    """Every project source file that running ``script`` can import."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += [f for f in map(_module_file, _imports(path)) if f is not None and f not in seen]
    return seen


def _stages() -> list[tuple[str, str, Path]]:
    out = []
    for pipeline in PIPELINES:
        for name, spec in yaml.safe_load((ROOT / pipeline).read_text())["stages"].items():
            cmd = (spec.get("do") or spec)["cmd"]
            script = re.search(r"-m (stages\.\w+)", cmd).group(1)
            out.append((pipeline, name, _module_file(script)))
    return out


@pytest.mark.parametrize(("pipeline", "stage", "script"), _stages(), ids=lambda v: str(v))
def test_each_stage_depends_on_every_module_it_imports(pipeline, stage, script):
    deps = {p.resolve() for p in stage_code_files(stage, pipeline)}
    missing = sorted(str(f.relative_to(ROOT)) for f in imported_files(script) if f.resolve() not in deps)
    assert not missing, f"{pipeline}: stage {stage} imports {missing} but does not depend on them"


def test_the_trace_sees_lazy_imports_and_skips_type_checking_ones(tmp_path):
    assert ROOT / "regionroute" / "objective.py" in imported_files(ROOT / "regionroute" / "train.py")  # top level
    lazy = imported_files(ROOT / "stages" / "train.py")  # `from regionroute.train import train` inside main()
    assert ROOT / "regionroute" / "train.py" in lazy and ROOT / "regionroute" / "__init__.py" in lazy


def test_the_library_imports_form_no_circle():
    """Module-to-module imports (lazy ones included; packages' ``__init__`` re-exports aside) are a DAG."""
    import networkx as nx

    graph = nx.DiGraph()
    for path in (ROOT / "regionroute").rglob("*.py"):
        for name in _imports(path):
            target = _module_file(name)
            if target is not None and target != path and target.name != "__init__.py":
                graph.add_edge(path.relative_to(ROOT).as_posix(), target.relative_to(ROOT).as_posix())
    assert graph.number_of_edges() > 100
    assert list(nx.simple_cycles(graph)) == []
