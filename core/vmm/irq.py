"""Interrupt wires between the VMM's devices: a line has a level; whoever listens sees it.

An edge-triggered input (the 8259 in its default mode, the PIT's IRQ 0) reacts to
the line going from low to high; a level-triggered one to the line being high. A
device drives its output line with :meth:`IrqLine.set_level` (or :meth:`pulse`, a
low-high-low edge) and never needs to know what is connected to it.
"""

from __future__ import annotations

from collections.abc import Callable


class IrqLine:
    """One interrupt wire: a level, and listeners called when it changes."""

    __slots__ = ("_level", "_listeners", "name")

    def __init__(self, name: str = "irq") -> None:
        self.name = name
        self._level = False
        self._listeners: list[Callable[[bool], None]] = []

    @property
    def level(self) -> bool:
        return self._level

    def connect(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(level)`` on every change of level."""
        self._listeners.append(listener)

    def set_level(self, level: bool) -> None:
        level = bool(level)
        if level == self._level:
            return
        self._level = level
        for listener in self._listeners:
            listener(level)

    def pulse(self) -> None:
        """A rising then a falling edge (what an edge-triggered source sends)."""
        self.set_level(True)
        self.set_level(False)
