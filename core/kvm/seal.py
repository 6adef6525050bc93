"""Sealed references: what a plugin's view holds in place of KVM's own objects.

A view (:class:`~sevsim.kvm.context.VcpuView`, a VM's bus view) offers operations
that act on KVM's objects: the vCPU, the VM. If it held those objects, or callables
bound to them, attribute access alone would lead a plugin from its exit context to
the whole hypervisor: a bound method's ``__self__`` or a closure's cells reach the
``Vcpu``, from there its ``Vm``, ``Kvm`` and ``Platform``, and with them
``Vcpu.run``, ``Kvm.create_vm`` and every other vCPU. A :class:`Seal` holds a number
instead, as :mod:`sevsim.hw`'s handles do for the hardware, and only the view's own
code turns it back into the object, with :func:`unseal`.

The threat model: sealing keeps KVM's objects out of *reach by attribute access*
from anything a plugin receives (attributes, properties, closures, bound methods,
method results), which tests/test_boundary_walker.py checks by walking all of them.
It does not stop a plugin that sets out to break the boundary from inside the same
Python process (``gc.get_objects()``, ``ctypes``, or importing this module to call
:func:`unseal`): the boundary keeps plugins to what a hypervisor's feature code can
see and makes leaving it deliberate, it is not a sandbox.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any, Generic, TypeVar

from sevsim.errors import PluginError

T = TypeVar("T")

#: Sealed objects by number. Weak: a seal does not keep its object alive, so a view
#: that outlives its vCPU or VM does not keep them running.
_sealed: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
_numbers = itertools.count(1)


class Seal(Generic[T]):
    """A number naming an object, and a description of it for messages."""

    __slots__ = ("_number", "_what")

    def __init__(self, target: T, what: str) -> None:
        self._number = next(_numbers)
        self._what = what
        _sealed[self._number] = target

    def __repr__(self) -> str:
        return f"<sealed {self._what}>"


def unseal(seal: Seal[T]) -> T:
    """The object ``seal`` names; a :class:`~sevsim.errors.PluginError` once it is gone
    (a plugin kept a view of a destroyed VM and used it)."""
    target: T | None = _sealed.get(seal._number)
    if target is None:
        raise PluginError(f"{seal._what} is gone: a plugin used a view of it after the VM "
                          "was destroyed")  # fmt: skip
    return target
