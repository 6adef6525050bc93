"""Meta-tests for the hook specifications: each is documented by a working example,
tested somewhere, and the observer hooks match the events kvm emits."""

from __future__ import annotations

import doctest
import inspect
from pathlib import Path

import pytest

from sevsim.hw import SIM_EVENTS
from sevsim.kvm.events import EVENTS
from sevsim.kvm.extensions import LIFECYCLE
from sevsim.plugin import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKSPECS = sorted(
    name
    for name, value in vars(hookspecs).items()
    if callable(value) and hasattr(value, f"{hookspecs.PROJECT}_spec")
)
START_UP = {"sevsim_configure", "sevsim_exit_handlers"}
#: Called for each plugin on its own with its own state: state factories, lifecycle.
PER_PLUGIN = {"sevsim_vm_state", "sevsim_vcpu_state", *(f"sevsim_{h}" for h in LIFECYCLE)}


def test_hookspecs_are_found() -> None:
    assert START_UP <= set(HOOKSPECS)
    assert PER_PLUGIN <= set(HOOKSPECS)
    assert len(HOOKSPECS) == len(START_UP) + len(PER_PLUGIN) + len(EVENTS) + len(SIM_EVENTS)


def test_every_sevsim_function_in_the_module_is_a_hookspec() -> None:
    functions = {n for n, v in vars(hookspecs).items() if n.startswith("sevsim_") and callable(v)}
    assert functions == set(HOOKSPECS)


def test_markers_use_the_project_name() -> None:
    assert hookspecs.hookspec.project_name == hookspecs.hookimpl.project_name == "sevsim"


def test_observer_hooks_match_the_events_kvm_and_the_silicon_emit() -> None:
    observers = {
        name: tuple(inspect.signature(getattr(hookspecs, name)).parameters)
        for name in HOOKSPECS
        if name not in START_UP | PER_PLUGIN
    }
    events = {**EVENTS, **SIM_EVENTS}
    assert observers == {f"sevsim_{event}": fields for event, fields in events.items()}


@pytest.mark.parametrize("name", HOOKSPECS)
def test_hookspec_docstring_has_a_working_example(name: str) -> None:
    spec = getattr(hookspecs, name)
    doc = inspect.getdoc(spec) or ""
    assert "Example::" in doc, f"{name}: docstring has no 'Example::' section"
    [test] = doctest.DocTestFinder(recurse=False).find(spec, name, globs={})
    assert len(test.examples) >= 3, f"{name}: the example is too short to show anything"
    runner = doctest.DocTestRunner()
    result = runner.run(test, out=lambda text: pytest.fail(f"{name} example failed:\n{text}"))
    assert result.failed == 0 and result.attempted == len(test.examples)


def _test_sources() -> dict[Path, str]:
    files = [
        path
        for pattern in ("tests/**/*.py", "plugins/*/tests/**/*.py")
        for path in ROOT.glob(pattern)
        if path.name.startswith("test_") or path.name == "conftest.py"
    ]
    return {f: f.read_text() for f in files if f.resolve() != Path(__file__).resolve()}


@pytest.mark.parametrize("name", HOOKSPECS)
def test_hookspec_is_used_by_a_test(name: str) -> None:
    users = [path for path, text in _test_sources().items() if name in text]
    assert users, f"no test_*.py in tests/ or plugins/*/tests/ mentions {name}: test it"
