"""The plugin documentation runs: every example of docs/writing-plugins.md and
docs/testing-plugins.md, as a reader would use it.

Each block of those documents is marked by the HTML comment before it:
``<!-- file: PATH -->`` (written to PATH in a fresh folder), ``<!-- run -->`` (a
console block: each ``$`` command runs there, with sevsim's ``bin`` first on PATH,
must succeed and print every other line of the block) or ``<!-- not run: WHY -->``.
A block with no mark fails the test, so no example goes unchecked; ``text`` blocks
(drawings) need none.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from sevsim.arch.ghcb import GHCB_SAVE_AREA
from sevsim.guest.asm import assemble
from sevsim.guest.image import CODE, GHCB_GPA, GuestImage
from sevsim.hw import Platform
from sevsim.kvm.exits import SystemEvent, SystemEventType
from sevsim.kvm.vm import Kvm
from sevsim.plugin.config import load_config
from sevsim.plugin.host import PluginHost
from sevsim.vmm.launch import launch_image

ROOT = Path(__file__).resolve().parent.parent
DOCS = {name: ROOT / "docs" / f"{name}.md" for name in ("writing-plugins", "testing-plugins")}
BIN = Path(sys.executable).parent
BLOCK = re.compile(r"(?:<!-- (?P<mark>[^>]*?) -->\n)?```(?P<lang>\w*)\n(?P<body>.*?)\n```", re.S)


@attrs.frozen
class Block:
    mark: str | None
    lang: str
    body: str


def blocks(doc: Path) -> list[Block]:
    return [Block(m["mark"], m["lang"], m["body"]) for m in BLOCK.finditer(doc.read_text())]


def write_files(doc: Path, folder: Path) -> None:
    for block in blocks(doc):
        if block.mark and block.mark.startswith("file: "):
            path = folder / block.mark.removeprefix("file: ")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.body + "\n")


@attrs.frozen
class Command:
    line: str
    expected: tuple[str, ...]


def commands(doc: Path) -> list[Command]:
    found = []
    for block in blocks(doc):
        if block.mark != "run":
            continue
        lines = block.body.splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("$ ")]
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(lines)
            found.append(Command(lines[start][2:], tuple(lines[start + 1 : end])))
    return found


def _normal(text: str) -> str:
    return " ".join(text.split())


#: Commands that cannot do what the document shows yet: (doc, command) -> what must change.
NOT_YET: dict[tuple[str, str], str] = {}


def _cases() -> list[object]:
    cases = []
    for name, doc in DOCS.items():
        for command in commands(doc):
            reason = NOT_YET.get((name, command.line))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, command, id=f"{name}: {command.line}", marks=marks))
    return cases


@pytest.mark.parametrize("name", DOCS)
def test_every_block_is_written_run_or_says_why_not(name):
    found = blocks(DOCS[name])
    assert found, "no code blocks found"
    unmarked = [b.body.splitlines()[0] for b in found if b.mark is None and b.lang != "text"]
    assert unmarked == []
    marks = {b.mark.split(":")[0] for b in found if b.mark}
    assert marks <= {"file", "run", "not run"}
    assert "file" in marks and "run" in marks


@pytest.mark.parametrize(("name", "command"), _cases())
def test_the_documented_command_works(tmp_path, name, command):
    write_files(DOCS[name], tmp_path)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("SEVSIM_PLUGINS", None)
    done = subprocess.run(command.line, shell=True, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    lines = {_normal(line) for line in output.splitlines()}
    missing = [line for line in command.expected if _normal(line) not in lines]
    assert missing == [], output


@pytest.fixture
def tutorial(tmp_path, monkeypatch):
    """The tutorial's folder, written out and on the Python path, as the current folder."""
    write_files(DOCS["writing-plugins"], tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SEVSIM_PLUGINS", raising=False)
    yield tmp_path
    for module in ("sevsim_ticket", "ticket_watch"):
        sys.modules.pop(module, None)


def test_the_tutorial_plugin_loads_with_p_and_answers_a_guest(tutorial):
    host = PluginHost(load_config(cli=["sevsim_ticket"], strict=True))
    (ticket,) = [info for info in host.plugins() if info.name == "sevsim_ticket"]
    assert (ticket.source, ticket.status) == ("module", "active")
    assert [(e.code, e.name) for e in ticket.owns] == [(0xF000_0010, "SEVSIM_VMGEXIT_TICKET")]
    image = GuestImage(assemble((tutorial / "ticket.S").read_text(), CODE))
    vm = launch_image(Kvm(Platform()), image, handlers=host.start(), events=host.events)
    # sevsim.toml's first = 100 reached the plugin; the guest checked both replies
    # and the refusal, and terminated with reason code 0
    assert vm.vcpus[0].run(60) == SystemEvent(SystemEventType.SEV_TERM, (0x100,))
    ghcb = vm.memory.read(GHCB_GPA, 0x1000)

    def field(name: str) -> int:
        return int.from_bytes(ghcb[GHCB_SAVE_AREA.offset(name) :][:8], "little")

    # the last exchange: a request for 0 tickets, refused as malformed input
    assert (field("sw_exit_code"), field("rax")) == (0xF000_0010, 0)
    assert (field("sw_exit_info_1"), field("sw_exit_info_2")) == (2, 5)
