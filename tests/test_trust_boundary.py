"""The trust boundary of DESIGN.md, checked on the import graph.

The hypervisor side (``sevsim.kvm``, ``sevsim.vmm``, plugins) may use the hardware
only through ``sevsim.hw``'s public surface, never its internals (the CPU model,
the memory engine's plaintext views).
"""

import ast
import ctypes
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HYPERVISOR_SIDE = [
    *sorted((ROOT / "core" / "kvm").glob("*.py")),
    *sorted((ROOT / "core" / "vmm").glob("*.py")),
    *sorted((ROOT / "plugins").rglob("*.py")),
]
ALLOWED = {"sevsim.hw"}
#: The VMM also takes the guest's #VC model interface, to bind a modeled #VC handler
#: before launch: the launch path of tests/test_import_layers.py's table.
ALLOWED_TO_THE_VMM = ALLOWED | {"sevsim.hw.vc_model"}


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
    vmm = path.parent == ROOT / "core" / "vmm"
    assert set(hw_imports(path)) <= (ALLOWED_TO_THE_VMM if vmm else ALLOWED)


SECRET = 0x5EC2_E75E_C2E7_5EC2


def _reachable(root: object, depth: int = 7) -> list[object]:
    """Every value reachable from ``root`` through public attributes (no leading "_")."""
    seen: set[int] = set()
    found: list[object] = []
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for obj in frontier:
            plain_callable = callable(obj) and not hasattr(obj, "__dict__")
            if id(obj) in seen or isinstance(obj, type) or plain_callable:
                continue
            seen.add(id(obj))
            found.append(obj)
            if isinstance(obj, dict):
                nxt += list(obj.values())
            elif isinstance(obj, list | tuple | set | frozenset):
                nxt += list(obj)
            elif isinstance(obj, ctypes.Array):
                found.append(bytes(obj))
            elif not isinstance(obj, int | bytes | bytearray | memoryview | str):
                for name in dir(obj):
                    if name.startswith("_"):
                        continue
                    try:
                        value = getattr(obj, name)
                    except Exception:
                        continue
                    if not callable(value) or hasattr(value, "__dict__"):
                        nxt.append(value)
        frontier = nxt
    return found


def test_a_plugin_cannot_reach_guest_plaintext_or_registers():
    from guests import guest, launch

    from sevsim.guest.snippets import TERMINATE
    from sevsim.kvm.dispatch import ExitHandler, ExitKind, ExitTable
    from sevsim.kvm.outcome import RESUME

    secret = SECRET.to_bytes(8, "little")
    spied: list[object] = []

    def spy(ctx):
        spied.extend(_reachable(ctx))
        return RESUME

    table = ExitTable([ExitHandler(ExitKind.MSR_PROTOCOL, 0x100, spy)])
    vm = launch(guest(f"""
        mov r12, {SECRET:#x}           /* a secret in a register ... */
        mov rsi, 0x31000
        mov [rsi], r12                 /* ... and in private memory */
    """ + TERMINATE + "hlt"), table=table)
    vm.vcpus[0].run()
    assert spied, "the spy plugin never ran"
    for value in spied:
        if isinstance(value, int):
            assert value != SECRET
        elif isinstance(value, bytes | bytearray | memoryview):
            assert secret not in bytes(value)
