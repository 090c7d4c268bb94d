"""The privilege split in the source tree: namespace-side modules (nsnet/ns/)
never import the libslirp binding, the libslirp wrapper or host-side code;
host-side modules (nsnet/host/) never import namespace-side code.  Checked
statically, on every import statement (top level and inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

import nsnet

PKG = Path(nsnet.__file__).resolve().parent


def _imports(path: Path) -> set[str]:
    """Absolute dotted names of every module `path` imports."""
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
        package = parts
    else:
        package = parts[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def _side(name: str) -> list[Path]:
    return sorted((PKG / name).rglob("*.py"))


FORBIDDEN_NS = ("nsnet._slirp_cffi", "nsnet.host", "nsnet.supervisor", "nsnet.sandbox")
FORBIDDEN_HOST = ("nsnet.ns",)


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for f in files:
        for mod in _imports(f):
            if any(mod == x or mod.startswith(x + ".") for x in forbidden):
                bad.append(f"{f.relative_to(PKG.parent)} imports {mod}")
    return bad


def test_sides_exist():
    assert _side("ns") and _side("host")


def test_namespace_side_imports_nothing_of_the_host_side():
    assert _violations(_side("ns"), FORBIDDEN_NS) == []


def test_host_side_imports_no_namespace_code():
    assert _violations(_side("host"), FORBIDDEN_HOST) == []


def test_checker_sees_relative_imports(tmp_path):
    # The checker itself: a relative import of the binding is caught.
    fake = PKG / "ns" / "helper.py"
    assert "nsnet.fdpass" in _imports(fake)
