"""Mutants of the method's core, applied in memory (the repository untouched), and the tests that
must catch each one.

A mutant is a one-place edit of the library's source: ``old`` (found exactly once in ``module``'s
source) becomes ``new``. Applying it recompiles the function or method that holds ``old`` with the
edit and puts it where the original was (the module attribute, or the class attribute for a
method), and every module of the package that imported the original by name gets the mutant.
Mutants are data: ``tests/mutants_<area>.yaml`` files, each a list of the fields of :class:`Mutant`; ``tools/mutation_check.py``
runs each mutant's ``caught_by`` tests under it (``VLM2REC_MUTANT=<name>``, read by conftest.py)
and reports which fail: every mutant must make at least one of them fail.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
PACKAGE = "vlm2rec_lab"


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # e.g. "vlm2rec_lab.losses"
    old: str  # a snippet found exactly once in the module's source
    new: str  # what it becomes
    why: str  # the behaviour the mutant breaks, in words
    caught_by: tuple[str, ...]  # pytest node ids (default tier) that must fail under it


def all_mutants() -> dict[str, Mutant]:
    """Every mutant of every ``tests/mutants_*.yaml``, by name (names are unique)."""
    found: dict[str, Mutant] = {}
    fields = {f.name for f in dataclasses.fields(Mutant)}
    for path in sorted(HERE.glob("mutants_*.yaml")):
        for i, entry in enumerate(yaml.safe_load(path.read_text()) or []):
            if not isinstance(entry, dict) or set(entry) != fields:
                got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise ValueError(f"{path}: entry {i + 1} must have exactly the fields {sorted(fields)}, got {got}")
            m = Mutant(**{**entry, "caught_by": tuple(entry["caught_by"])})
            if m.name in found:
                raise ValueError(f"{path}: mutant {m.name!r} is defined twice")
            found[m.name] = m
    return found


def _holder(tree: ast.Module, start: int, stop: int) -> tuple[ast.AST, ast.ClassDef | None]:
    """The top-level function, or the method of a top-level class, whose source spans the
    character range [start, stop) (as line numbers: see :func:`locate`)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _spans(node, start, stop):
            return node, None
        if isinstance(node, ast.ClassDef) and _spans(node, start, stop):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _spans(item, start, stop):
                    return item, node
            raise ValueError(f"the snippet sits in class {node.name} outside any of its methods")
    raise ValueError("the snippet sits outside any function or method")


def _first_line(node) -> int:
    return min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])


def _spans(node, start: int, stop: int) -> bool:
    return _first_line(node) <= start and stop <= node.end_lineno


def locate(m: Mutant) -> tuple[object, str, ast.AST, ast.ClassDef | None]:
    """(module, its source, the function holding ``old``, its class or None); raises where ``old``
    is not found exactly once (the code moved: the mutant must be rewritten, not dropped)."""
    module = importlib.import_module(m.module)
    source = inspect.getsource(module)
    n = source.count(m.old)
    if n != 1:
        raise ValueError(f"mutant {m.name}: its snippet occurs {n} times in {m.module} (expected once): {m.old!r}")
    at = source.index(m.old)
    start = source.count("\n", 0, at) + 1
    stop = start + m.old.count("\n")
    node, cls = _holder(ast.parse(source), start, stop)
    return module, source, node, cls


def apply(m: Mutant) -> None:
    """Put mutant ``m`` in place, in memory, for the rest of this process."""
    module, source, node, cls = locate(m)
    lines = source.splitlines(keepends=True)
    first = _first_line(node)
    segment = "".join(lines[first - 1:node.end_lineno])
    assert segment.count(m.old) == 1, f"mutant {m.name}: the snippet spans more than one function"
    code = textwrap.dedent(segment.replace(m.old, m.new))
    # compiled at its place in the file, so that tracebacks and line numbers still point there
    compiled = compile("\n" * (first - 1) + code, inspect.getsourcefile(module), "exec")
    namespace: dict = {}
    exec(compiled, module.__dict__, namespace)  # noqa: S102 (our own source, edited by a test)
    mutated = namespace[node.name]
    if cls is not None:
        setattr(getattr(module, cls.name), node.name, mutated)
        return
    original = module.__dict__[node.name]
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith(PACKAGE):
            for k, v in list(vars(mod).items()):
                if v is original:
                    setattr(mod, k, mutated)


def apply_named(name: str) -> Mutant:
    mutants = all_mutants()
    if name not in mutants:
        raise KeyError(f"no mutant {name!r}; known: {', '.join(sorted(mutants))}")
    apply(mutants[name])
    return mutants[name]
