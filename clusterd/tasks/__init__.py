"""The task registry: named tasks, each a split on the server, a run on a worker, a combine."""

from clusterd.tasks.registry import Registry, Task, TaskInputError, load_registry

__all__ = ["Registry", "Task", "TaskInputError", "load_registry"]
