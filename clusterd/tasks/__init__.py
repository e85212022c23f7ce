"""Tasks: the bottom layer of clusterd (user functions, pure, no Twisted). ``clusterd.core``
imports :class:`Registry`, :class:`Task` and :class:`TaskInputError` from here; nothing here
imports ``clusterd.core``."""

from clusterd.tasks.decorator import task
from clusterd.tasks.loading import ENTRY_POINT_GROUP, load_registry
from clusterd.tasks.registry import Registry, Task, TaskInputError

__all__ = ["Registry", "Task", "TaskInputError", "load_registry", "task", "ENTRY_POINT_GROUP"]
