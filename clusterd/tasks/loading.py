"""Where a server's or worker's tasks come from: the built-ins, then the ``clusterd.tasks``
entry-point group, then each ``--tasks`` module. Kept apart from :mod:`clusterd.tasks.registry`
so the registry never imports the built-ins that are defined with it (no import cycle)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

from clusterd.tasks import builtins
from clusterd.tasks.decorator import task_of
from clusterd.tasks.registry import Registry, Task

__all__ = ["load_registry", "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "clusterd.tasks"


def _tasks_of(obj: Any, origin: str) -> list[Task]:
    if isinstance(obj, Task):
        return [obj]
    if isinstance(obj, ModuleType):
        return _module_tasks(obj, origin)
    if isinstance(obj, (list, tuple)) and all(isinstance(t, Task) for t in obj):
        return list(obj)
    raise ValueError(f"{origin}: expected a Task, a list of Tasks or a module with TASKS")


def _module_tasks(module: ModuleType, origin: str) -> list[Task]:
    """A module's ``TASKS`` list, then its ``@task`` functions (those defined in it, not
    imported into it), each task once."""
    found: list[Task] = []
    if hasattr(module, "TASKS"):
        found = _tasks_of(module.TASKS, origin)
    for value in list(vars(module).values()):
        t = task_of(value)
        if t is not None and getattr(value, "__module__", None) == module.__name__:
            if not any(t is f for f in found):
                found.append(t)
    if not found and not hasattr(module, "TASKS"):
        raise ValueError(
            f"{origin}: module {module.__name__} defines no TASKS list and no @task function"
        )
    return found


def load_registry(modules: Iterable[str] = (), use_entry_points: bool = True) -> Registry:
    """Built-ins, then entry points, then each ``--tasks`` module, by import name."""
    reg = Registry(builtins.TASKS)
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            for t in _tasks_of(ep.load(), f"entry point {ep.name}"):
                reg.add(t)
    for name in modules:
        for t in _tasks_of(importlib.import_module(name), f"--tasks {name}"):
            reg.add(t)
    return reg
