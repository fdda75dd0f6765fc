"""The package layout rule (issue 10): one stem per notebook everywhere, a shared core that never imports the paper
code, paper code split into models/ (architectures), methods/ (attach to any timm model) and experiments/ (what one
notebook calls), and no oversized modules. Checked statically from the source tree: the modules checked are parsed
(tokenbook.runs.module_imports, the reader of the run store's code versions), never imported."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tokenbook.runs import module_imports

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "lib" / "tokenbook"
#: the shared core: may import each other (without cycles), never models/, methods/ or experiments/; every module of
#: the package outside those three is core (test_every_module_is_core_or_paper_code)
CORE = ("data", "train", "bench", "results", "references", "repro", "viz", "runner", "gpu_budget", "claims", "report",
        "kernel_launcher", "io", "constants", "runs", "ensemble", "floors", "released", "params", "heldout")
PAPER_PACKAGES = ("models", "methods", "experiments")
MAX_LINES = 1200
GUIDE_LINES = 820  # "about 800 lines": over this a module states its reason ("Size:") in its docstring


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every tokenbook module a file imports, at any depth (function-level imports included)."""
    found, _ = module_imports(path, _module_name(path))
    return {m for m in found if m.split(".")[0] == "tokenbook"}


def _sources() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def _stems() -> dict[str, str]:
    """notebook name -> stem, e.g. '03_toe' -> 'toe'."""
    return {p.stem: p.stem.split("_", 1)[1] for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}


def _is_paper_module(name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 1 and parts[1] in PAPER_PACKAGES


@pytest.mark.parametrize("path", [p for p in _sources() if _module_name(p).split(".")[1:2] and
                                  _module_name(p).split(".")[1] in CORE], ids=lambda p: str(p.relative_to(PKG)))
def test_core_never_imports_paper_code(path):
    bad = sorted(i for i in _imports(path) if _is_paper_module(i))
    assert not bad, f"{path.relative_to(ROOT)} is shared core and must not import {bad}"


def test_import_graph_checker_sees_violations(tmp_path):
    """The checker itself: a core-like file importing models/ (absolute, relative, function-level) is caught."""
    fake = PKG / "data" / "_probe_for_test.py"
    src = "def f():\n    from ..models import vittm\n    import tokenbook.experiments.toe\n"
    try:
        fake.write_text(src)
        found = {i for i in _imports(fake) if _is_paper_module(i)}
    finally:
        fake.unlink()
    assert {"tokenbook.models", "tokenbook.experiments.toe"} <= found


def test_models_and_methods_never_import_experiments():
    for path in _sources():
        top = _module_name(path).split(".")[1:2]
        if top and top[0] in ("models", "methods"):
            bad = sorted(i for i in _imports(path) if i.startswith("tokenbook.experiments"))
            assert not bad, f"{path.relative_to(ROOT)} must not import experiments: {bad}"


def test_one_stem_per_notebook_everywhere():
    stems = _stems()
    assert set(stems.values()) == {"baselines", "vittm", "t2t_vit", "toe", "seit", "memory", "cross_paper"}
    for nb, stem in stems.items():
        assert (PKG / "experiments" / f"{stem}.py").is_file(), f"no tokenbook/experiments/{stem}.py for {nb}"
        assert (PKG / "references" / f"{stem}.yaml").is_file(), f"no references/{stem}.yaml for {nb}"
        assert (ROOT / "notebooks" / "params" / nb).is_dir(), f"no notebooks/params/{nb}/"
        assert list((ROOT / "tests").glob(f"test_{stem}*.py")) or stem == "baselines", f"no tests/test_{stem}*.py"
    # every results folder belongs to a notebook
    for d in (ROOT / "results").iterdir():
        if d.is_dir() and re.match(r"\d\d_", d.name):
            assert d.name in stems, f"results/{d.name} matches no notebook"
    # every experiments module belongs to a notebook: <stem>.py, or a part of it, <stem>_<part>.py, that the main
    # module re-exports (and that cannot import it back: no cycles); nothing is left at the old places
    exp = {p.stem for p in (PKG / "experiments").glob("*.py") if p.stem != "__init__"}
    assert set(stems.values()) <= exp
    for part in sorted(exp - set(stems.values())):
        owner = [st for st in stems.values() if part.startswith(st + "_")]
        assert owner, f"experiments/{part}.py belongs to no notebook (name it <stem>_<part>.py)"
        main_src = (PKG / "experiments" / f"{owner[0]}.py").read_text()
        assert f"from tokenbook.experiments.{part} import" in main_src, f"{owner[0]}.py does not re-export {part}"
        # (that the part does not import its main module back is the no-cycle test's job)
    assert not list(PKG.glob("*_runs.py"))
    for old in ("toe", "memory", "vittm", "t2t", "tokens", "token_aug"):
        assert not (PKG / f"{old}.py").exists(), f"tokenbook/{old}.py should have moved"


def test_every_notebook_imports_its_experiments_module_the_same_way():
    for nb, stem in _stems().items():
        cells = json.loads((ROOT / "notebooks" / f"{nb}.ipynb").read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert f"from tokenbook.experiments import {stem} as exp\n" in code, nb
        assert not re.search(r"RunContext\.from_notebook\(\"(?!" + nb + r"\")", code), nb


def test_no_module_is_oversized():
    for path in _sources():
        n = len(path.read_text().splitlines())
        assert n <= MAX_LINES, f"{path.relative_to(ROOT)} has {n} lines (> {MAX_LINES})"
        if n > GUIDE_LINES:
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert re.search(r"\bSize:", doc), (f"{path.relative_to(ROOT)} has {n} lines (> {GUIDE_LINES}) "
                                                 "and no 'Size:' reason in its docstring")


def test_every_module_is_core_or_paper_code():
    tops = {_module_name(p).split(".")[1] for p in _sources() if len(_module_name(p).split(".")) > 1}
    unlisted = sorted(tops - set(CORE) - set(PAPER_PACKAGES))
    assert not unlisted, f"tokenbook modules in neither CORE nor {PAPER_PACKAGES}: {unlisted} (add them to CORE)"


def _import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (any depth, function-level imports included), each import resolved
    to the longest existing module it names (``from .io import atomic_write`` -> ``tokenbook.io``). The bare
    ``tokenbook`` package (which every import runs) and a module's own name are left out."""
    mods = {_module_name(p): p for p in _sources()}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        out = set()
        for imp in _imports(path):
            parts = imp.split(".")
            target = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in mods),
                          None)
            if target and target not in (name, "tokenbook"):
                out.add(target)
        graph[name] = out
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a path that returns to its start) per strongly connected component of more than one module
    (Tarjan's algorithm, then a shortest cycle through the component's first module)."""
    index, low, stack, on, comps = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    cycles = []
    for comp in comps:
        start, members = comp[0], set(comp)
        prev, frontier = {start: None}, [start]
        found = None
        while frontier and found is None:  # breadth-first back to start inside the component
            nxt = []
            for v in frontier:
                for w in sorted(graph[v] & members):
                    if w == start:
                        found = v
                        break
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
                if found is not None:
                    break
            frontier = nxt
        path, v = [], found
        while v is not None:
            path.append(v)
            v = prev[v]
        cycles.append(path[::-1] + [start])
    return cycles


def test_cycle_finder_sees_a_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_import_graph_has_no_cycle():
    cycles = _cycles(_import_graph())
    assert not cycles, "import cycles in tokenbook: " + "; ".join(" -> ".join(c) for c in cycles)
