"""One exception hierarchy for everything sevsim reports.

Every message says what was wrong, with which value, and what was expected, so a
user can act on it without reading a traceback.
"""

from __future__ import annotations


class SevsimError(Exception):
    """Base of every error sevsim raises on purpose."""


class PluginOverran(BaseException):
    """Raised inside plugin code still running when its KVM_RUN's time limit passed
    (by the host timer, :mod:`sevsim.hw.watchdog`).

    A BaseException, so that a plugin's own ``except Exception`` does not swallow it;
    kvm contains it like any other fault of the plugin and names the plugin.
    """

    def __init__(self, *args: object) -> None:
        super().__init__(*args or ("still running when its KVM_RUN's time limit passed",))


class ForeignBaseException(Exception):
    """A BaseException subclass (not KeyboardInterrupt) that foreign code raised,
    carried as an Exception so that containment catches it.

    Python lets any class derived from BaseException be raised; an ``except`` clause
    cannot name "every BaseException but KeyboardInterrupt", so the one place that
    calls foreign code (:func:`sevsim.hw.watchdog.run_foreign`) converts such an
    exception into this one, with the original as ``__cause__`` and its traceback.
    """

    def __init__(self, original: BaseException) -> None:
        super().__init__(f"{type(original).__name__}: {original}")
        self.original = original


#: What code sevsim runs on someone else's behalf (a plugin's import, hooks, exit
#: handlers and observers; a modeled #VC handler) may raise and still be contained
#: as that code's own failure. A plugin or guest model calling ``sys.exit()`` must not
#: end sevsim; other BaseException subclasses arrive as ForeignBaseException (see
#: there). Only KeyboardInterrupt (the user's Ctrl-C) passes.
FOREIGN_FAULTS = (Exception, SystemExit, PluginOverran)


class LayoutError(SevsimError):
    """A layout table was asked for a field it does not have, or a value does not fit."""


class GuestMemoryError(SevsimError):
    """A guest-physical access outside RAM, or an overlapping region."""


class SevFirmwareError(SevsimError):
    """A SEV firmware (PSP) command failed; ``status`` is the firmware's status name.

    The names are those of AMD's SEV API specification (INVALID_GUEST_STATE,
    INVALID_ADDRESS, INVALID_PARAM, ...), so a failing launch reads like the real one.
    """

    def __init__(self, command: str, status: str, detail: str) -> None:
        super().__init__(f"{command} failed: {status}: {detail}")
        self.command = command
        self.status = status
        self.detail = detail


class VcpuError(SevsimError):
    """A vCPU was used in a way KVM refuses (run after SHUTDOWN, read protected state)."""


class ConfigError(SevsimError):
    """A configuration value is missing, of the wrong type or out of range."""


class PluginError(SevsimError):
    """A plugin failed to load, register, or two plugins claim the same exit code.

    ``plugin`` names the plugin at fault when one is (an observer that raised).
    """

    def __init__(self, message: str, plugin: str | None = None) -> None:
        super().__init__(message)
        self.plugin = plugin
