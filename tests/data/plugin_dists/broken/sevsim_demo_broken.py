"""A plugin whose import fails: a dependency is missing."""

import sevsim_demo_missing_dependency  # noqa: F401
