"""sevsim's pytest plugin, for plugin authors and for sevsim's own tests.

Opt in from a test module or ``conftest.py``::

    pytest_plugins = ["sevsim.testing"]

Fixtures:

- ``plugin_host``: :func:`isolated_host`, a factory for a plugin host that sees only
  the plugins a test chooses (no ``sevsim.toml``, no environment, no autoload), with
  strict on, so that a test never picks up whatever else is installed and a broken
  plugin fails the test instead of being skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytest

from sevsim.plugin.config import isolated_config
from sevsim.plugin.host import PluginHost


def isolated_host(
    plugins: Mapping[str, object] | None = None,
    *,
    enable: Iterable[str] = (),
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    owners: Mapping[str | int, str] | None = None,
    strict: bool = True,
) -> PluginHost:
    """A host with exactly ``plugins`` (name -> module or object) plus the installed
    entry-point plugins named in ``enable``.

    ``settings`` maps a plugin name to its ``[plugins.settings.<name>]`` table and
    ``owners`` is a ``[plugins.owners]`` table. Call ``.start()`` for the exit table
    and use ``.events`` as kvm's event sink.
    """
    config = isolated_config(enable=enable, settings=settings, owners=owners, strict=strict)
    return PluginHost(config, plugins=plugins or {})


@pytest.fixture
def plugin_host() -> Callable[..., PluginHost]:
    """:func:`isolated_host`: ``plugin_host({"mine": MyPlugin()}).start()``."""
    return isolated_host
