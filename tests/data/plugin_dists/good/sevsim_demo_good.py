"""A well-behaved third-party plugin: owns one hypervisor-defined VMGEXIT code and
watches VMGEXITs. The tests put its folder on sys.path, where importlib.metadata
finds its dist-info and entry point."""

from sevsim.errors import ConfigError
from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.outcome import RESUME
from sevsim.plugin.hookspecs import hookimpl

HELLO = 0x8000_0F00
#: exit_reason of every observed VMGEXIT.
seen: list[int] = []


def hello(*exit_context: object) -> object:
    return RESUME


@hookimpl
def sevsim_configure(settings):
    greeting = settings.get("greeting", "hello")
    if not isinstance(greeting, str):
        raise ConfigError(f"greeting = {greeting!r}: expected a string")
    return {"greeting": greeting}


@hookimpl
def sevsim_exit_handlers(config):
    yield ExitHandler(ExitKind.VMGEXIT, HELLO, hello, requires=("rax",))


@hookimpl
def sevsim_vmgexit_enter(exit_reason):
    seen.append(exit_reason)
