"""The layers of DESIGN.md, checked on every module's imports.

:data:`LAYERS` says which layers each layer may import. It is written from the
design, not from whatever the code imports today:

- ``arch`` is pure layouts and constants; ``errors`` is the one error hierarchy.
- ``hw`` is the silicon and the SEV firmware, and sees nothing above it.
- The hypervisor side (``kvm``, ``plugin``, ``plugins``, ``vmm``) reaches the hardware
  only through ``sevsim.hw``'s public surface, never its internal modules, and never
  the trace, which carries what only a simulator can see (guest RIPs, instructions).
  The VMM may load guest images (``guest``) and take the guest's #VC handler model
  (``sevsim.hw.vc_model``'s types) to bind it before launch: that is the launch path
  through which a guest's code and its #VC handler are chosen.
- ``guest`` is guest software: it talks to the hypervisor only through guest memory,
  the GHCB MSR and VMGEXIT, so it imports no hypervisor layer (``kvm``, ``vmm``,
  ``plugin``) and not the trace; of the hardware it sees only the #VC model interface
  (``sevsim.hw.vc_model``: what a #VC handler written in Python runs against).
- ``trace`` (``core/trace*.py``) describes exits and simulator events; it imports no
  guest code and no VMM.
- The tools on top (``cli``, ``testing``, ``attack``, and ``manifest``, which reads a
  guest manifest: the guest, its machine, KVM's and the plugins' settings, the outcome
  expected) and ``api`` assemble the rest.

A module's imports are read with :mod:`ast`, everywhere in the file (a function-local
or ``TYPE_CHECKING`` import is a dependency too). Tests directories are not layers.
Where today's code breaks a rule, its file is marked ``xfail(strict=True)`` in
:data:`KNOWN_VIOLATIONS` with the offending import and what must change; the mark
fails as soon as the file is fixed, so that it is removed with the fix.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import sevsim.hw

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "core"

#: The hardware as guest software sees it: the #VC model interface.
HW_GUEST_SIDE = "hw:guest-side"
#: Any ``sevsim.hw.<module>`` other than the guest side: the hardware's internals.
HW_INTERNAL = "hw:internal"
#: ``import sevsim`` / ``from sevsim import hookimpl``: the root package's re-exports.
ROOT_PACKAGE = "sevsim"

_TOOLS = {ROOT_PACKAGE, "errors", "arch", "hw", HW_GUEST_SIDE, "kvm", "plugin", "vmm", "guest",
          "trace"}  # fmt: skip

#: Layers made of the top-level modules whose names start with the layer's name.
PREFIXED_LAYERS = ("trace", "cli", "manifest")

#: Layer -> the layers it may import (its own layer is always allowed).
LAYERS: dict[str, frozenset[str]] = {
    "errors": frozenset(),
    "arch": frozenset({"errors"}),
    "hw": frozenset({"errors", "arch", HW_INTERNAL, HW_GUEST_SIDE}),
    "kvm": frozenset({"errors", "arch", "hw"}),
    "plugin": frozenset({"errors", "arch", "hw", "kvm"}),
    "plugins": frozenset({ROOT_PACKAGE, "api", "errors", "arch", "hw", "kvm", "plugin"}),
    "vmm": frozenset({"errors", "arch", "hw", HW_GUEST_SIDE, "kvm", "plugin", "guest"}),
    "guest": frozenset({"errors", "arch", HW_GUEST_SIDE}),
    "trace": frozenset({ROOT_PACKAGE, "errors", "arch", "hw", "kvm"}),
    "manifest": frozenset(_TOOLS),
    "cli": frozenset(_TOOLS | {"attack", "manifest", "replay"}),
    "testing": frozenset(_TOOLS),
    "attack": frozenset(_TOOLS | {"testing"}),
    "replay": frozenset(_TOOLS),
    "api": frozenset({"errors", "arch", "hw", "kvm", "plugin", "guest", "testing"}),
    ROOT_PACKAGE: frozenset({"errors", "plugin"}),
}

#: Files that break a rule today: path -> the offending imports and what must change.
#: Empty: the VMM's run loops, which imported the trace, now take a tool's observer
#: (``sevsim.vmm.runner.RunObserver``) and decode termination reasons with
#: ``sevsim.kvm.termination``.
KNOWN_VIOLATIONS: dict[str, str] = {}


def layer_of_file(path: Path) -> str:
    """The layer a source file belongs to."""
    relative = path.relative_to(ROOT)
    if relative.parts[0] == "plugins":
        return "plugins"
    inner = relative.relative_to("core").parts
    if len(inner) > 1:
        return inner[0]
    stem = path.stem
    if stem == "__init__":
        return ROOT_PACKAGE
    for prefix in PREFIXED_LAYERS:
        if stem.startswith(prefix):
            return prefix
    return stem


def _hw_bindings() -> dict[str, tuple[str, str]]:
    """Name bound by ``core/hw/__init__.py`` -> (the hw module it comes from, its name
    there): ``from sevsim.hw.psp import Psp as _Psp`` binds ``_Psp`` to ``Psp``."""
    tree = ast.parse((CORE / "hw" / "__init__.py").read_text())
    return {
        alias.asname or alias.name: (node.module, alias.name)
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sevsim.hw.")
        for alias in node.names
    }


HW_BINDINGS = _hw_bindings()
#: Where the hardware's guest-facing interface lives.
GUEST_SIDE_MODULES = frozenset({"sevsim.hw.vc_model"})


def layer_of_import(module: str) -> str | None:
    """The layer ``from module import ...`` (or ``import module``) reaches."""
    parts = module.split(".")
    if parts[0] != "sevsim":
        return None
    if len(parts) == 1:
        return ROOT_PACKAGE
    top = parts[1]
    if top == "hw" and len(parts) > 2:
        return HW_GUEST_SIDE if module in GUEST_SIDE_MODULES else HW_INTERNAL
    for prefix in PREFIXED_LAYERS:
        if top.startswith(prefix):
            return prefix
    return top


def _absolute(path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = ["sevsim", *path.relative_to(CORE).parts[:-1]]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _is_submodule(module: str, name: str) -> bool:
    """Whether ``from module import name`` imports a module of sevsim's core."""
    folder = CORE.joinpath(*module.split(".")[1:], name)
    return folder.is_dir() or folder.with_suffix(".py").is_file()


def imports(path: Path) -> list[tuple[str, str]]:
    """(layer reached, the import as written) for each sevsim import in ``path``;
    ``from package import module`` counts as importing that module."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            module = _absolute(path, node)
            names = tuple(alias.name for alias in node.names)
            text = f"line {node.lineno}: from {module} import {', '.join(names)}"
            submodules = [n for n in names if _is_submodule(module, n)]
            targets = [layer_of_import(f"{module}.{n}") for n in submodules]
            if len(submodules) < len(names):
                targets.append(layer_of_import(module))
            found += [(layer, text) for layer in targets if layer is not None]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                layer = layer_of_import(alias.name)
                if layer is not None:
                    found.append((layer, f"line {node.lineno}: import {alias.name}"))
    return found


def violations(path: Path) -> list[str]:
    layer = layer_of_file(path)
    allowed = LAYERS[layer] | {layer}
    found = [
        f"{layer} -> {target}: {text}" for target, text in imports(path) if target not in allowed
    ]
    return list(dict.fromkeys(found))


SOURCES = sorted(
    p
    for p in [*CORE.rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    if "tests" not in p.relative_to(ROOT).parts
)


def _case(path: Path) -> object:
    name = str(path.relative_to(ROOT))
    reason = KNOWN_VIOLATIONS.get(name)
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(path, id=name, marks=marks)


@pytest.mark.parametrize("path", [_case(p) for p in SOURCES])
def test_module_imports_only_what_its_layer_may(path):
    assert violations(path) == []


def test_every_source_file_belongs_to_a_layer_of_the_table():
    unknown = {str(p.relative_to(ROOT)): layer_of_file(p) for p in SOURCES}
    assert {f: layer for f, layer in unknown.items() if layer not in LAYERS} == {}


def test_known_violations_name_real_files():
    assert sorted(set(KNOWN_VIOLATIONS) - {str(p.relative_to(ROOT)) for p in SOURCES}) == []


# --- the checker itself --------------------------------------------------------------


def _plant_root(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Check files under ``root`` as if it were the checkout (with sevsim's real core
    folders, so that submodule names resolve)."""
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "ROOT", root)
    for folder in CORE.iterdir():
        target = root / "core" / folder.name
        if not target.exists():
            target.symlink_to(folder)
    monkeypatch.setattr(this, "CORE", root / "core")


@pytest.mark.parametrize(
    ("layer_dir", "source", "expected"),
    [
        ("guest", "from sevsim.vmm.machine import Devices\n", "guest -> vmm"),
        ("guest", "from sevsim.hw import Platform\n", "guest -> hw"),
        ("kvm", "from sevsim.hw.cpu import GuestCpu\n", f"kvm -> {HW_INTERNAL}"),
        ("kvm", "from sevsim.hw.vc_model import GuestView\n", f"kvm -> {HW_GUEST_SIDE}"),
        ("kvm", "def f():\n    from sevsim.plugin.host import PluginHost\n", "kvm -> plugin"),
        ("arch", "from .. import trace\n", "arch -> trace"),
        ("kvm", "from sevsim.hw import sim\n", f"kvm -> {HW_INTERNAL}"),
        ("kvm", "import sevsim.vmm.launch\n", "kvm -> vmm"),
    ],
)
def test_the_checker_catches_a_forbidden_import(tmp_path, monkeypatch, layer_dir, source, expected):
    module = tmp_path / "core" / layer_dir / "planted.py"
    module.parent.mkdir(parents=True)
    module.write_text(source)
    _plant_root(monkeypatch, tmp_path)
    found = violations(module)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_the_checker_allows_the_guest_side_of_the_hardware_to_guest_code(tmp_path, monkeypatch):
    module = tmp_path / "core" / "guest" / "planted.py"
    module.parent.mkdir(parents=True)
    module.write_text("from sevsim.hw.vc_model import GuestFault, GuestView\n"
                      "from sevsim.arch import msr\n")
    _plant_root(monkeypatch, tmp_path)
    assert violations(module) == []


# --- sevsim.hw's public surface ---------------------------------------------------------

#: Hardware internals that hold what the hypervisor must never reach: plaintext guest
#: memory, the PSP's keys, the CPU models, VMSA plaintext (module -> class names).
SECRET_HOLDERS = {
    "sevsim.hw.memory": ("GuestMemory",),
    "sevsim.hw.psp": ("Psp",),
    "sevsim.hw.svm": ("Svm", "HostPages", "VmsaPage"),
    "sevsim.hw.cpu": ("GuestCpu",),
}


def guest_side_exports(
    names: set[str], bindings: dict[str, tuple[str, str]] = HW_BINDINGS
) -> list[str]:
    """Those of ``names`` (bound in ``sevsim.hw`` as ``bindings`` say) that are
    guest-side or secret holders, under whatever name they are bound."""
    found = []
    for name in sorted(names):
        home, original = bindings.get(name, ("", name))
        if home in GUEST_SIDE_MODULES or original in SECRET_HOLDERS.get(home, ()):
            found.append(f"{name} (from {home})")
    return found


def _bound_by_init() -> set[str]:
    """Public names ``core/hw/__init__.py`` binds itself (imports, defs, assignments);
    submodules appear as attributes of any package and are not counted."""
    tree = ast.parse((CORE / "hw" / "__init__.py").read_text())
    names = set(HW_BINDINGS)
    for node in tree.body:
        if isinstance(node, ast.ClassDef | ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def test_hw_all_exports_nothing_guest_side():
    assert guest_side_exports(set(sevsim.hw.__all__)) == []


def test_hw_package_binds_no_public_guest_side_or_secret_holding_name():
    assert guest_side_exports(_bound_by_init()) == []


def test_the_surface_check_knows_the_secret_holders():
    # Every class SECRET_HOLDERS names exists, so the check above looks for real things.
    import importlib

    for module, classes in SECRET_HOLDERS.items():
        for name in classes:
            assert isinstance(getattr(importlib.import_module(module), name), type)
    assert guest_side_exports({"Platform", "GuestMemoryView"}) == []
    # a secret holder or the guest side is found under any public name it is bound to
    planted = {"Psp": ("sevsim.hw.psp", "Psp"), "View": ("sevsim.hw.vc_model", "GuestView"),
               "Handle": ("sevsim.hw.svm", "VmsaPage"), "Usage": ("sevsim.hw.svm", "Usage")}
    assert guest_side_exports(set(planted), planted) == [
        "Handle (from sevsim.hw.svm)",
        "Psp (from sevsim.hw.psp)",
        "View (from sevsim.hw.vc_model)",
    ]
    # the real package binds them, privately
    assert {"_Psp", "_VcModel"} <= set(HW_BINDINGS)
