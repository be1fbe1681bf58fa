"""Dependencies point down: gateway -> guard/workers -> pipeline -> router/specialists -> policy/kernels
-> core. A module may import its own package and anything on a lower layer, never a higher one or a
sibling on its own layer (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import concilium

PACKAGE = Path(concilium.__file__).parent

LAYERS = {
    "core": 0, "settings": 0,
    "policy": 1, "kernels": 1,
    "router": 2, "specialists": 2,
    "pipeline": 3,
    "guard": 4, "workers": 4,
    "gateway": 5,
    "cli": 6, "testing": 6,  # entry points and test helpers may use everything
}
ENTRY_POINTS = "cli.py"  # a package's command-line module sits above every layer (it wires them)


def _imports(path: Path) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return [(n, m) for n, m in out if m.startswith("concilium.")]


def _part(module_path: Path) -> str:
    rel = module_path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 or rel.stem != "__init__" else "core"


def test_every_package_has_a_layer():
    parts = {_part(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__"}
    assert parts <= set(LAYERS), parts - set(LAYERS)


def test_no_module_imports_upward_or_sideways():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _part(path)
        if own not in LAYERS or path.name == ENTRY_POINTS:
            continue
        for line, module in _imports(path):
            target = module.split(".")[1]
            if target == own or target not in LAYERS:
                continue
            if LAYERS[target] >= LAYERS[own]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module} ({target})")
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("def f():\n    from concilium.gateway.app import create_app\n")
    assert _imports(bad) == [(2, "concilium.gateway.app")]
