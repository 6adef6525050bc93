"""Finding plugins without importing them.

A plugin is either an entry point in the ``sevsim.plugins`` group (built-in ones are
declared by the ``sevsim`` distribution itself, exactly like third-party ones) or an
object handed to the host by code (tests, :mod:`sevsim.testing`). Discovery only
reads metadata: nothing is imported until the host has decided the plugin is
enabled, which is how ``-p no:NAME`` keeps a broken plugin's import from running.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from collections.abc import Callable, Mapping
from importlib.metadata import EntryPoint, entry_points

from attrs import field, frozen

GROUP = "sevsim.plugins"
BUILTIN_DIST = "sevsim"
DIRECT = "direct"
MODULE = "module"
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@frozen
class Candidate:
    """A plugin the host may load: its name, where it comes from, how to import it."""

    name: str
    #: "builtin", "entry point: <distribution>" or "direct".
    source: str
    version: str | None
    load: Callable[[], object] = field(repr=False)
    #: Whether ``autoload`` applies; a directly registered object loads unless disabled.
    autoload_candidate: bool = True
    #: Why this name cannot be loaded at all (declared twice), found without importing.
    problem: str | None = None


def _normalized(dist_name: str) -> str:
    return re.sub(r"[-_.]+", "-", dist_name).lower()


def _entry_point_candidate(name: str, eps: list[EntryPoint]) -> Candidate:
    dists = [ep.dist.name if ep.dist else "<unknown distribution>" for ep in eps]
    first, dist = eps[0], eps[0].dist
    source = (
        "builtin"
        if dist is not None and _normalized(dist.name) == BUILTIN_DIST
        else f"entry point: {dists[0]}"
    )
    problem = None
    if len(eps) > 1:
        problem = (
            f"entry point {name!r} is declared by several distributions "
            f"({', '.join(dists)}); uninstall all but one"
        )
    return Candidate(name, source, dist.version if dist else None, first.load, True, problem)


def discover(direct: Mapping[str, object]) -> dict[str, Candidate]:
    """Installed entry points plus ``direct`` objects (which shadow a same-named entry point)."""
    grouped: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=GROUP):
        grouped.setdefault(ep.name, []).append(ep)
    found = {name: _entry_point_candidate(name, eps) for name, eps in grouped.items()}
    for name, plugin in direct.items():
        found[name] = Candidate(name, DIRECT, None, _given(plugin), False)
    return found


def _given(plugin: object) -> Callable[[], object]:
    """The loader of a direct plugin: the object itself, nothing to import."""
    return lambda: plugin


def module_candidate(name: str) -> Candidate | None:
    """``-p some.module``: a module that is no installed plugin, loaded as one (named
    by its dotted path), as pytest's ``-p`` does; None if ``name`` names no module."""
    if not _MODULE_PATH.match(name):
        return None
    try:
        if importlib.util.find_spec(name) is None:
            return None
    except (ImportError, ValueError):
        return None
    return Candidate(name, MODULE, None, lambda: importlib.import_module(name), False)
