"""Stands for a built-in plugin: its entry point is declared by a distribution named
``sevsim``, which the host lists as "builtin"."""
