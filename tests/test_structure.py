"""The package's import structure: no import cycles between its modules, and no module using another's private names.

Every ``.py`` file under ``softcache/``, ``kernels/`` (``softcache.kernels``) and ``cli/`` (``softcache.cli``) is
parsed with ``ast``; imports inside functions count as much as module-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"softcache": ROOT / "softcache", "softcache.kernels": ROOT / "kernels", "softcache.cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    out = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def resolve(module: str | None, level: int, package: str) -> str:
    if level == 0:
        return module or ""
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def imports(name: str, path: Path, known: dict[str, Path]):
    """(imported module, imported name or None, line) for every import of a softcache module in ``path``."""
    package = package_of(name, path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("softcache"):
                    yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.module, node.level, package)
            if not target.startswith("softcache"):
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, None, node.lineno) if sub in known else (target, alias.name, node.lineno)


def owner(module: str, known: dict[str, Path]) -> str:
    """The known module that ``module`` names (itself, or its nearest known parent)."""
    while module not in known and "." in module:
        module = module.rpartition(".")[0]
    return module


def graph():
    known = modules()
    edges: dict[str, set[str]] = {name: set() for name in known}
    private: list[str] = []
    for name, path in known.items():
        for target, imported, line in imports(name, path, known):
            mod = owner(target, known)
            if mod != name:
                edges[name].add(mod)
            where = f"{path.relative_to(ROOT)}:{line}"
            if imported is not None and imported.startswith("_") and not imported.startswith("__"):
                private.append(f"{where} imports {imported} from {mod}")
            # a private module (``_x``) may only be imported from inside its own package
            for i, part in enumerate(mod.split(".")):
                if part.startswith("_") and part != "__init__":
                    home = ".".join(mod.split(".")[:i])
                    if not (name == home or name.startswith(home + ".")):
                        private.append(f"{where} imports the private module {mod}")
    return known, edges, private


def private_attributes(known: dict[str, Path]) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``: reaching into another object's private state. The backends'
    conformance suite (``format/testing.py``) is test code: it stops a shard writer half-way to play a crash."""
    found = []
    for name, path in known.items():
        if name == "softcache.format.testing":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = node.value
                if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                    continue
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    continue  # a subclass extending its base's hook (the HF Trainer's column handling)
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} .{node.attr}")
    return found


ALLOWED_ATTRIBUTES = {
    "._strip_protocol",  # fsspec's documented way to turn a URL into a path
    "._dynamo",  # torch._dynamo.is_compiling: whether a kernel is being traced
    "._new_shared",  # torch.UntypedStorage._new_shared: shared-memory batches, as torch's default_collate
}


def test_no_import_cycles():
    known, edges, _ = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            # a package's __init__ re-exports its submodules: importing them from it is not a cycle
            if known[nxt].name == "__init__.py" and node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " → ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(known):
        if name not in state:
            visit(name)


def test_no_private_names_across_modules():
    known, _, private = graph()
    attributes = [a for a in private_attributes(known) if not any(a.endswith(ok) for ok in ALLOWED_ATTRIBUTES)]
    assert not private + attributes, "\n".join(private + attributes)


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The walker sees relative imports, private names and cycles (on a made-up package)."""
    pkg = tmp_path / "softcache"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n    return a.c._x\n_hidden = 1\n")
    monkeypatch.setitem(PACKAGES, "softcache", pkg)
    monkeypatch.delitem(PACKAGES, "softcache.kernels")
    monkeypatch.delitem(PACKAGES, "softcache.cli")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path, raising=False)
    known, edges, private = graph()
    assert edges["softcache.a"] == {"softcache.b"} and edges["softcache.b"] == {"softcache.a"}
    assert any("imports _hidden from softcache.b" in p for p in private)
    assert any(a.endswith("._x") for a in private_attributes(known))
    try:
        test_no_import_cycles()
    except AssertionError as e:
        assert "softcache.a → softcache.b → softcache.a" in str(e)
    else:
        raise AssertionError("the cycle was not found")


def test_test_modules_do_not_import_each_other():
    """Tests share fixtures through their folder's conftest.py: no file under tests/ imports a test module."""
    tests = ROOT / "tests"
    test_modules = {path.stem for path in tests.rglob("test_*.py")}
    found = []
    for path in tests.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top == "tests" or top in test_modules:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not found, "\n".join(found)
