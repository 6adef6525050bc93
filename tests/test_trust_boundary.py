"""The trust boundary of DESIGN.md, checked on the import graph.

The hypervisor side (``sevsim.kvm``, ``sevsim.vmm``, plugins) may use the hardware
only through ``sevsim.hw``'s public surface, never its internals (the CPU model,
the memory engine's plaintext views).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HYPERVISOR_SIDE = [
    *sorted((ROOT / "core" / "kvm").glob("*.py")),
    *sorted((ROOT / "core" / "vmm").glob("*.py")),
    *sorted((ROOT / "plugins").rglob("*.py")),
]
ALLOWED = {"sevsim.hw"}


def hw_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sevsim.hw"):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("sevsim.hw")]
    return found


@pytest.mark.parametrize("path", HYPERVISOR_SIDE, ids=lambda p: str(p.relative_to(ROOT)))
def test_hypervisor_side_uses_only_the_public_hardware_interface(path):
    assert set(hw_imports(path)) <= ALLOWED
