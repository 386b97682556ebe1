"""dvc.yaml's dependencies are complete: each stage depends on every project module its
command runs, so changing any of them (a default in config.py, the model loader that
evaluate uses) makes `dvc repro` run the stage again.

The modules come from the real import graph, not from a list kept here: the stage's entry
points are read from what ``cyclegan.cli``'s ``cmd_<stage>`` function imports, and from
there every ``import`` of a project module (also those inside functions) is followed, and
unioned with ``sys.modules`` after actually importing those entry points in a fresh
interpreter (which also sees imports done by name). A dep folder covers the files in it.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
PACKAGE = "cyclegan"
CLI = f"{PACKAGE}.cli"
STAGES = ("prepare", "train", "evaluate", "register")


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _with_parents(name: str) -> list[str]:
    """Importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _imported_names(nodes: list[ast.stmt], module: str, is_package: bool) -> set[str]:
    """Project modules named by the imports in ``nodes`` (at any depth), plus string
    arguments like ``importlib.import_module("cyclegan.x")`` or the CLI's
    ``_lazy("cyclegan.x", ...)``."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in (n for top in nodes for n in ast.walk(top)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            # ``from cyclegan.data import sources`` imports the submodule ``sources``.
            found.update(f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Call) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.add(arg.value)
    return {n for n in found if (n == PACKAGE or n.startswith(PACKAGE + ".")) and _module_file(n)}


@cache
def _parsed(name: str) -> tuple[ast.Module, bool]:
    path = _module_file(name)
    assert path is not None, name
    return ast.parse(path.read_text(), filename=str(path)), path.name == "__init__.py"


def _closure(roots: set[str], walked: set[str]) -> set[str]:
    """Every project module reachable from ``roots`` through imports (any depth); the
    modules in ``walked`` have been looked into already."""
    seen: set[str] = set()
    todo = [p for r in roots for p in _with_parents(r)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in walked:
            continue
        tree, is_package = _parsed(name)
        for dep in _imported_names(tree.body, name, is_package):
            todo.extend(p for p in _with_parents(dep) if p not in seen)
    return seen


def _entry_modules(stage: str) -> set[str]:
    """What ``cyclegan <stage>`` loads from the CLI module: everything it imports except in
    the other commands' ``cmd_<name>`` functions (``main`` and its helpers run for every
    command; ``cmd_<stage>`` imports the stage itself)."""
    tree, _ = _parsed(CLI)
    mine = [n for n in tree.body if getattr(n, "name", None) == f"cmd_{stage}"]
    assert mine, f"{CLI} has no cmd_{stage}(): how does `cyclegan {stage}` run?"
    assert _imported_names(mine, CLI, False), f"cmd_{stage}() imports no project module"
    others = {
        n.name for n in tree.body if getattr(n, "name", "").startswith("cmd_") and n not in mine
    }
    kept = [n for n in tree.body if getattr(n, "name", None) not in others]
    return {CLI} | _imported_names(kept, CLI, False)


def _loaded_by_import(modules: set[str]) -> set[str]:
    """``sys.modules`` (project modules only) after importing ``modules`` for real."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {sorted(modules)!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted(n for n in sys.modules if n.split('.')[0] == {PACKAGE!r})))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert r.returncode == 0, f"importing {sorted(modules)} failed:\n{r.stderr[-3000:]}"
    return {n for n in json.loads(r.stdout.splitlines()[-1]) if _module_file(n)}


def _outs(stage: dict) -> set[str]:
    """Paths a stage writes (outs, metrics, plots), as written in dvc.yaml."""
    items = [i for k in ("outs", "metrics", "plots") for i in stage.get(k, [])]
    return {i if isinstance(i, str) else next(iter(i)) for i in items}


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(REPO)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


def test_stages_are_the_contract() -> None:
    """Four stages in the contract's order, each running one `cyclegan <stage>` command."""
    stages = _stages()
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        cmd = stage["cmd"]
        cmds = cmd if isinstance(cmd, list) else [cmd]
        assert cmds[-1] == f"cyclegan {name}", cmd
        assert [c for c in cmds if c.startswith("cyclegan")] == [f"cyclegan {name}"], cmd


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_every_module_the_stage_imports(stage: str) -> None:
    stages = _stages()
    deps = [d for d in stages[stage].get("deps", []) if isinstance(d, str)]
    # A dep no stage writes must exist in a fresh clone, or `dvc repro` stops at once.
    written = set().union(*(_outs(s) for s in stages.values()))
    absent = [d for d in deps if d not in written and not (REPO / d).exists()]
    assert not absent, f"stage {stage}: deps that do not exist and no stage writes: {absent}"

    entries = _entry_modules(stage)
    modules = _closure(entries, walked={CLI}) | _loaded_by_import(entries)
    files = sorted({_module_file(m) for m in modules} - {None})
    uncovered = [str(f.relative_to(REPO)) for f in files if not _covered(f, deps)]
    assert not uncovered, (
        f"dvc.yaml: stage {stage} runs these modules but does not depend on them, so "
        f"changing them would not re-run it; add them (or their folder) to its deps: {uncovered}"
    )


def test_metrics_and_lock_are_committed() -> None:
    """`dvc metrics diff` compares with the last commit: in a fresh clone it can only do so
    (instead of "failed to load some metrics for HEAD") if the metrics files and dvc.lock
    of a run are in git, as DVC intends for `cache: false` metrics."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    metrics = sorted(
        m for s in _stages().values() for m in _outs({"metrics": s.get("metrics", [])})
    )
    wanted = ["dvc.lock", *metrics]
    tracked = subprocess.run(
        ["git", "ls-files", "--", *wanted], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    missing = [w for w in wanted if w not in tracked]
    assert not missing, (
        f"not in git: {missing}; run the default pipeline (make run) and commit them"
    )
