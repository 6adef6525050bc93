"""``sevsim plugins new NAME``: write a third-party plugin package that passes its tests.

The package is what docs/writing-plugins.md builds by hand, cut to the part every
plugin has: a ``pyproject.toml`` whose ``sevsim.plugins`` entry point makes an
installed sevsim find it, a module whose hookimpl owns one software-defined VMGEXIT
exit code (from ``SVM_EXIT_SW`` up, the hypervisor's to define), and tests that use
:mod:`sevsim.testing` both one exit at a time and with a real SEV-ES guest. Its tests
pass as written, run from the package's folder with nothing installed but sevsim
(``pytest``); ``PYTHONPATH=. sevsim -p NAME plugins`` loads it without installing.
"""

from __future__ import annotations

import argparse
import importlib.util
import keyword
import re
from pathlib import Path
from string import Template

from sevsim.cli_base import EXIT_OK, Parser, add_command
from sevsim.errors import ConfigError

#: A plugin name: the module's name and the entry point's, so an identifier, and
#: lower case as Python module names and sevsim's own plugins are.
_NAME = re.compile(r"[a-z][a-z0-9_]*")

_PYPROJECT = Template("""\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "A sevsim plugin that owns a VMGEXIT exit code of its own"
requires-python = ">=3.11"
dependencies = ["sevsim"]

[project.optional-dependencies]
test = ["pytest>=8"]

# How an installed sevsim finds the plugin (`pip install -e .`); the entry point's
# name is the plugin's name everywhere: `sevsim plugins`, `-p no:$name`,
# [plugins.settings.$name] in sevsim.toml.
[project.entry-points."sevsim.plugins"]
$name = "$name"

[tool.setuptools]
py-modules = ["$name"]

[tool.pytest.ini_options]
pythonpath = ["."]
testpaths = ["tests"]
""")

_MODULE = Template('''\
"""$name: a sevsim plugin that owns one VMGEXIT exit code of its own.

A guest asks through its GHCB page, as for any NAE event: ``sw_exit_code`` =
:data:`EXIT_CODE`, a number in RAX (marked valid); the reply is that number plus one
in RAX. Exit codes from ``SVM_EXIT_SW`` (0xf000_0000) up are software-defined, free
for a hypervisor to give its own meaning: pick one no other plugin you load claims.
Written by ``sevsim plugins new $name``; sevsim's docs/writing-plugins.md adds
settings and per-VM state.
"""

from __future__ import annotations

from collections.abc import Iterator

from sevsim import api

#: The plugin's name: its entry point's name in pyproject.toml.
NAME = "$name"
#: The ``sw_exit_code`` this plugin owns.
EXIT_CODE = api.SVM_EXIT_SW + 0x100

_U64 = (1 << 64) - 1


def handle(ctx: api.ExitContext) -> None:
    """RAX in: a number; RAX out: the number plus one (modulo 2**64).

    kvm has checked that the guest marked RAX valid (``requires``) and set the success
    reply (``sw_exit_info_1`` = ``sw_exit_info_2`` = 0); RAX..RDX go back to the GHCB
    and returning None resumes the guest.
    """
    value = ctx.regs["rax"]
    ctx.regs["rax"] = (value + 1) & _U64
    ctx.notes[NAME] = f"{value:#x} + 1"


@api.hookimpl
def sevsim_exit_handlers() -> Iterator[api.ExitHandler]:
    """The exit codes this plugin owns: one dispatch-table row each."""
    yield api.ExitHandler(api.ExitKind.VMGEXIT, EXIT_CODE, handle, requires=("rax",),
                          name="$code_name")
''')

_TESTS = Template('''\
"""$name's tests: its handler one exit at a time (no guest CPU), then a real guest."""

import $name
from sevsim import api

pytest_plugins = ["sevsim.testing"]

PLUGINS = {$name.NAME: $name}
AT = api.GHCB_SAVE_AREA.offset
VALID = sum(1 << api.valid_bit(field) for field in ("sw_exit_code", "sw_exit_info_1",
                                                    "sw_exit_info_2", "rax"))
#: Asks for 41 + 1 through its GHCB page; ends with reason code 0 when the answer is
#: 42, else 1.
GUEST = f"""
    mov rdi, {api.GHCB_GPA}
    mov rax, {$name.EXIT_CODE}
    mov [rdi + {AT('sw_exit_code')}], rax
    mov qword ptr [rdi + {AT('sw_exit_info_1')}], 0
    mov qword ptr [rdi + {AT('sw_exit_info_2')}], 0
    mov qword ptr [rdi + {AT('rax')}], 41
    mov rax, {VALID & (1 << 64) - 1}
    mov [rdi + {AT('valid_bitmap')}], rax
    mov rax, {VALID >> 64}
    mov [rdi + {AT('valid_bitmap') + 8}], rax
    mov ecx, {api.msr.MSR_AMD64_SEV_ES_GHCB}    /* GHCB MSR = the GHCB page */
    mov eax, {api.GHCB_GPA}
    xor edx, edx
    wrmsr
    rep vmmcall                     /* VMGEXIT */
    cmp qword ptr [rdi + {AT('rax')}], 42
    jne failed
{api.terminate(0, 0)}
    hlt
failed:
{api.terminate(0, 1)}
    hlt
"""


def ask(driver, fields):
    """One VMGEXIT with ``fields`` set and marked valid; the GHCB as the guest reads it."""
    return driver.vmgexit({"sw_exit_code": $name.EXIT_CODE, "sw_exit_info_1": 0,
                           "sw_exit_info_2": 0, **fields}).ghcb


def test_the_answer_is_rax_plus_one(plugin_host, exit_driver):
    reply = ask(exit_driver(plugin_host(PLUGINS).start()), {"rax": 41})
    assert (reply["rax"], reply["sw_exit_info_1"], reply["sw_exit_info_2"]) == (42, 0, 0)


def test_rax_not_marked_valid_is_missing_input(plugin_host, exit_driver):
    reply = ask(exit_driver(plugin_host(PLUGINS).start()), {})
    assert (reply["sw_exit_info_1"], reply["sw_exit_info_2"]) == (
        api.GhcbResp.MALFORMED_INPUT, api.GhcbErr.MISSING_INPUT,
    )


def test_a_guest_gets_its_answer(run_guest):
    run = run_guest(GUEST, PLUGINS, enable=["msr_protocol"])
    assert run.exit == api.SystemEvent(api.SystemEventType.SEV_TERM, (api.term_req(0, 0),))


def test_without_the_plugin_the_guest_gets_no_answer(run_guest):
    # kvm has no row for the code: GHCB_ERR_INVALID_EVENT, RAX unchanged
    run = run_guest(GUEST, enable=["msr_protocol"])
    assert run.exit == api.SystemEvent(api.SystemEventType.SEV_TERM, (api.term_req(0, 1),))
''')

_README = Template("""\
# $dist

A sevsim plugin, `$name`, that owns the VMGEXIT exit code `SVM_EXIT_SW + 0x100`
(written by `sevsim plugins new $name`).

    pytest                                  # its tests, from this folder
    PYTHONPATH=. sevsim -p $name plugins    # loaded without installing
    pip install -e .                        # installed: sevsim finds it by its entry point
""")


def write_plugin(name: str, folder: Path) -> list[Path]:
    """Write the package for plugin ``name`` into ``folder`` (new, or empty); the files
    written, in order."""
    if not _NAME.fullmatch(name) or keyword.iskeyword(name):
        raise ConfigError(
            f"plugins new {name!r}: expected a plugin name that is a Python module name "
            "in lower case (letters, digits, _), e.g. my_plugin"
        )
    if importlib.util.find_spec(name) is not None:
        raise ConfigError(
            f"plugins new {name!r}: a module named {name!r} is already importable here; "
            "choose another name"
        )
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise ConfigError(
            f"plugins new {name!r}: {folder} exists and is not an empty folder; give "
            "another with --dir"
        )
    fields = {"name": name, "dist": name.replace("_", "-"), "code_name": f"{name.upper()}_VMGEXIT"}
    files = {
        folder / "pyproject.toml": _PYPROJECT,
        folder / f"{name}.py": _MODULE,
        folder / "tests" / f"test_{name}.py": _TESTS,
        folder / "README.md": _README,
    }
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(template.substitute(fields))
    return list(files)


def cmd_plugins_new(args: argparse.Namespace) -> int:
    """Write the package and say what to do next."""
    folder = Path(args.dir) if args.dir is not None else Path(args.name.replace("_", "-"))
    for path in write_plugin(args.name, folder):
        print(f"wrote {path}")
    print(f"next: cd {folder} && pytest; PYTHONPATH=. sevsim -p {args.name} plugins")
    return EXIT_OK


def add_new_command(subcommands: argparse._SubParsersAction[Parser]) -> None:
    new = add_command(
        subcommands, "new", "write a new plugin package that passes its tests",
        examples=["sevsim plugins new my_plugin", "sevsim plugins new my_plugin --dir plugin"],
    )  # fmt: skip
    new.add_argument(
        "name", metavar="NAME", help="the plugin's name: its module and entry point (my_plugin)"
    )
    new.add_argument(
        "--dir", metavar="D", help="the folder to write (new or empty; default: NAME, - for _)"
    )
    new.set_defaults(func=cmd_plugins_new)
