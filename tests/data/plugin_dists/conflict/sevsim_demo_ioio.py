"""Two plugins in one distribution that both claim SVM_EXIT_IOIO: the module itself
(entry point demo_ioio) and the object ``rival`` (entry point demo_rival)."""

from sevsim.kvm.dispatch import ExitHandler, ExitKind
from sevsim.kvm.outcome import RESUME
from sevsim.plugin.hookspecs import hookimpl

IOIO = 0x7B


def port_io(*exit_context: object) -> object:
    return RESUME


@hookimpl
def sevsim_exit_handlers():
    yield ExitHandler(ExitKind.VMGEXIT, IOIO, port_io, requires=("rax",))


class Rival:
    @hookimpl
    def sevsim_exit_handlers(self):
        return [ExitHandler(ExitKind.VMGEXIT, IOIO, port_io)]


rival = Rival()
