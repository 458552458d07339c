"""The project's layering, read from the source: no import cycles among trainer/, parallel/, data/, slurm/;
parallel/ and data/ import nothing from trainer/; no module over 400 lines; every document a file cites lies inside
the project (docs/testing.md "What the unit tests pin")."""
import ast
import os
import re

from tests.helpers import ROOT

PACKAGES = ("trainer", "parallel", "data", "slurm")
MAX_LINES = 400


def modules() -> dict[str, str]:
    """module name -> path of every .py file in the four packages."""
    out = {}
    for package in PACKAGES:
        for base, dirs, files in os.walk(os.path.join(ROOT, package)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(base, name)
                    module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[module.removesuffix(".__init__")] = path
    return out


def import_graph(mods: dict[str, str]) -> dict[str, set[str]]:
    """module -> the project modules it imports (anywhere in the file; `from a.b import c` names a.b.c if that is a
    module, else a.b)."""
    graph = {}
    for module, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        # importing a.b.c runs package a.b's __init__ first: an edge to it, unless the importer lives inside it
        # (then the package is already being imported). trainer.model_card -> trainer.stages.artifacts ran
        # trainer/stages/__init__, which imported the model card back: `python -m trainer.export` failed to import
        for target in list(targets):
            parent = target.rpartition(".")[0]
            while parent:
                if parent in mods and not module.startswith(parent + "."):
                    targets.add(parent)
                parent = parent.rpartition(".")[0]
        targets.discard(module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph(modules())) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_parallel_and_data_import_nothing_from_trainer():
    graph = import_graph(modules())
    wrong = sorted((m, t) for m, targets in graph.items() for t in targets
                   if m.split(".")[0] in ("parallel", "data") and t.split(".")[0] == "trainer")
    assert wrong == []


def test_no_module_over_400_lines():
    long = {path: n for path in modules().values() if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert long == {}


# a document citation: a path ending in .md (a bare name, docs/design.md, a ../ path, slurm/README.md)
DOC_REFERENCE = re.compile(r"(?<![\w/.-])((?:\.\./|\./)?[\w./-]*[\w-]\.md)\b")
CHECKED_SUFFIXES = (".py", ".json", ".yaml", ".sbatch", ".md", ".sh")


def cited_documents(text: str) -> list[str]:
    return [m.group(1) for m in DOC_REFERENCE.finditer(text)]


def test_the_citation_finder_sees_outside_references():
    md = ".md"   # spelt apart so that this file cites nothing itself
    text = f"see NOTES{md}, ../elsewhere/SETUP{md} §6 and docs/design{md} (docs/algorithms{md} \"ADM\")"
    assert cited_documents(text) == [f"NOTES{md}", f"../elsewhere/SETUP{md}", f"docs/design{md}",
                                     f"docs/algorithms{md}"]


def test_every_cited_document_is_inside_the_project():
    """A citation resolves relative to the citing file's folder or to the project root, and stays inside it."""
    missing = []
    for base, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "runs")]
        for name in files:
            if not name.endswith(CHECKED_SUFFIXES):
                continue
            path = os.path.join(base, name)
            with open(path, encoding="utf-8") as f:
                text = f.read()
            for cited in cited_documents(text):
                candidates = [os.path.normpath(os.path.join(base, cited)), os.path.normpath(os.path.join(ROOT, cited))]
                inside = [c for c in candidates if c.startswith(ROOT + os.sep) and os.path.isfile(c)]
                if not inside:
                    missing.append(f"{os.path.relpath(path, ROOT)}: {cited}")
    assert missing == []
