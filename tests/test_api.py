"""``sevsim.api``: the one import a plugin author needs.

The promise is checked against what plugins really use: every name that the bundled
plugins and the example third-party plugin (its package and its tests) import from
``sevsim.*`` must be available from ``sevsim.api`` as the very same object. The
bundled plugins' own tests are left out on purpose: they are sevsim's white-box
tests of its feature areas (they build VMs from ``sevsim.kvm.vm`` and read
``sevsim.vmm`` devices), not what a plugin author writes.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import sevsim.api as api

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_SOURCES = sorted(p for p in (ROOT / "plugins").rglob("*.py") if "tests" not in p.parts)
EXAMPLE_SOURCES = sorted((ROOT / "examples" / "sevsim-hv-counter").rglob("*.py"))


def _sevsim_module(name: str | None) -> bool:
    return name is not None and (name == "sevsim" or name.startswith("sevsim."))


def _attributes_used(tree: ast.AST, alias: str) -> set[str]:
    """``alias.X`` for every X the module reads through a module imported as ``alias``."""
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == alias
    }


def imported_names(path: Path) -> list[tuple[str, str, set[str]]]:
    """(module, name, attributes used through it) for each ``from sevsim... import name``
    in ``path``; the attribute set matters only when ``name`` is itself a module."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _sevsim_module(node.module):
            assert node.module is not None
            if node.module.startswith("sevsim.plugins"):
                continue  # a plugin importing a plugin: not API
            for alias in node.names:
                used = _attributes_used(tree, alias.asname or alias.name)
                found.append((node.module, alias.name, used))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                assert not _sevsim_module(alias.name), (
                    f"{path}: `import {alias.name}`; the check below expects `from ... import`"
                )
    return found


def _exported(value: object) -> bool:
    return any(getattr(api, name) is value for name in api.__all__)


def missing_from_api(paths: list[Path], root: Path = ROOT) -> list[str]:
    missing = []
    for path in paths:
        for module, name, used in imported_names(path):
            value = getattr(importlib.import_module(module), name)
            if _exported(value):
                continue
            if isinstance(value, ModuleType):
                # `from sevsim.kvm import outcome as O`: the names read through it count
                absent = sorted(a for a in used if not _exported(getattr(value, a)))
                if not absent:
                    continue
                name = f"{name} ({', '.join(absent)})"
            missing.append(f"{path.relative_to(root)}: from {module} import {name}")
    return missing


@pytest.mark.parametrize(
    "paths",
    [PLUGIN_SOURCES, EXAMPLE_SOURCES],
    ids=["bundled plugins", "example plugin and its tests"],
)
def test_every_name_plugins_import_is_in_the_api(paths):
    assert paths, "no sources found: the paths above are stale"
    assert missing_from_api(paths) == []


def test_the_check_notices_a_name_the_api_lacks(tmp_path):
    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "from sevsim.kvm import outcome as O\n"
        "from sevsim.kvm.vcpu import MpState\n"
        "from sevsim.arch.ghcb import Ghcb\n"
        "from sevsim.arch import msr as M\n"
        "from sevsim.kvm import vcpu as V\n"
        "x = O.RESUME, O.Resume, O.Fail, M.EFER_SVME, V.MpState, V.Vcpu\n"
    )
    # MpState is KVM's own; Ghcb, what is read through O, and the msr namespace are API
    assert missing_from_api([plugin], tmp_path) == [
        "plugin.py: from sevsim.kvm.vcpu import MpState",
        "plugin.py: from sevsim.kvm import vcpu (MpState, Vcpu)",
    ]


@pytest.mark.parametrize("name", api.__all__)
def test_each_name_is_the_object_of_the_module_that_defines_it(name):
    value = getattr(api, name)
    home = getattr(value, "__module__", None)
    if isinstance(value, ModuleType):
        assert value is importlib.import_module(value.__name__)
    elif home is not None and home.startswith("sevsim.") and hasattr(value, "__qualname__"):
        assert getattr(importlib.import_module(home), value.__qualname__) is value


def test_all_is_exactly_the_public_names():
    assert len(api.__all__) == len(set(api.__all__))
    public = {n for n in vars(api) if not n.startswith("_")}
    # the lazily loaded names are not in vars() until used; the rest must be listed,
    # and nothing else public may leak from the module's own imports
    assert public - set(api.__all__) == {"annotations", "importlib", "TYPE_CHECKING", "Any"}
    assert sorted(dir(api)) == sorted(api.__all__)


def test_an_unknown_name_is_an_attribute_error_naming_it():
    with pytest.raises(AttributeError, match="'ExitHandlers'"):
        api.ExitHandlers  # noqa: B018


def test_importing_the_api_needs_neither_pytest_nor_the_guest_side():
    probe = (
        "import sys, sevsim.api\n"
        "print(sorted(m for m in ('pytest', 'sevsim.testing', 'sevsim.guest', 'sevsim.vmm')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_testing_helpers_load_on_first_use():
    from sevsim import testing
    from sevsim.guest import snippets

    assert api.run_guest is testing.run_guest
    assert api.ExitDriver is testing.ExitDriver
    assert api.TERMINATE == snippets.TERMINATE


# --- a plugin written against sevsim.api alone, through the real dispatch path -----------

ECHO = api.SVM_EXIT_SW + 0x42


class Echo:
    """Answers ECHO with RAX + 1 and counts calls in its per-VM state."""

    @api.hookimpl
    def sevsim_vm_state(self):
        return {"calls": 0}

    @api.hookimpl
    def sevsim_exit_handlers(self):
        def echo(ctx: api.ExitContext) -> api.Outcome:
            ctx.vm.state["calls"] += 1
            ctx.regs["rax"] = ctx.regs["rax"] + 1
            ctx.regs["rbx"] = ctx.vm.state["calls"]
            ctx.notes["echo"] = f"rax {ctx.regs['rax'] - 1:#x} + 1"
            return api.RESUME

        yield api.ExitHandler(api.ExitKind.VMGEXIT, ECHO, echo, requires=("rax",), name="ECHO")


def test_a_plugin_written_against_the_api_alone_answers_its_exit():
    driver = api.ExitDriver(api.isolated_host({"echo": Echo()}).start())
    request = {"sw_exit_code": ECHO, "sw_exit_info_1": 0, "sw_exit_info_2": 0, "rax": 41}
    first = driver.vmgexit(request)
    second = driver.vmgexit(request)
    assert first.exit is None and second.exit is None
    assert isinstance(first.ghcb, api.Ghcb)
    assert (first.ghcb["rax"], first.ghcb["rbx"]) == (42, 1)
    assert (second.ghcb["rax"], second.ghcb["rbx"]) == (42, 2)
    assert (second.ghcb["sw_exit_info_1"], second.ghcb["sw_exit_info_2"]) == (0, 0)
    missing = driver.vmgexit({"sw_exit_code": ECHO, "sw_exit_info_1": 0, "sw_exit_info_2": 0})
    assert (missing.ghcb["sw_exit_info_1"], missing.ghcb["sw_exit_info_2"]) == (
        api.GhcbResp.MALFORMED_INPUT,
        api.GhcbErr.MISSING_INPUT,
    )
