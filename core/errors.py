"""One exception hierarchy for everything sevsim reports.

Every message says what was wrong, with which value, and what was expected, so a
user can act on it without reading a traceback.
"""

from __future__ import annotations


class SevsimError(Exception):
    """Base of every error sevsim raises on purpose."""


#: What code sevsim runs on someone else's behalf (a plugin's import, hooks, exit
#: handlers and observers; a modeled #VC handler) may raise and still be contained
#: as that code's own failure: everything but KeyboardInterrupt and GeneratorExit.
#: A plugin or guest model calling ``sys.exit()`` must not end sevsim.
FOREIGN_FAULTS = (Exception, SystemExit)


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
    """A plugin failed to load, register, or two plugins claim the same exit code."""
