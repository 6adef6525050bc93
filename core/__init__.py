"""sevsim: a simulator of an AMD SEV-ES hypervisor, modelled on Linux KVM.

Layers (DESIGN.md): ``sevsim.arch`` layouts and constants, ``sevsim.hw`` the silicon
and the SEV firmware, ``sevsim.kvm`` the hypervisor, ``sevsim.guest`` guest-side
helpers, ``sevsim.plugins.*`` the feature areas.
"""

from sevsim.errors import SevsimError
from sevsim.plugin.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["SevsimError", "__version__", "hookimpl"]
