"""What the server's and the worker's twistd option parsers share: value checkers, and loading
the secrets and the task registry in ``postOptions``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from twisted.python import usage

__all__ = ["positive_int", "positive_float", "load_secrets", "load_tasks"]


def positive_int(value: str) -> int:
    """An option value as an integer of at least 1; raises ValueError otherwise."""
    n = int(value)
    if n < 1:
        raise ValueError("must be a positive integer")
    return n


def positive_float(value: str) -> float:
    """An option value as a float greater than 0; raises ValueError otherwise."""
    n = float(value)
    if not n > 0:
        raise ValueError("must be positive")
    return n


def load_secrets(options: Any, sources: Iterable[tuple[str, str, str]]) -> dict[str, bytes]:
    """role -> secret, for each ``(role, file option, environment variable)`` that gives one
    (file first, then the variable; SECURITY.md). A secret that cannot be read is a usage
    error: twistd prints it as one line and exits, before anything starts."""
    from clusterd.core.auth import SecretError, load_secret

    try:
        found = {
            role: load_secret(_secret_path(options, opt, env), env) for role, opt, env in sources
        }
    except SecretError as e:
        raise usage.UsageError(str(e)) from e
    return {role: secret for role, secret in found.items() if secret is not None}


def _secret_path(options: Any, opt: str, env: str) -> str | None:
    """The secret file option's path, unless it came from the config file while the secret's
    own variable is set: the environment outranks the file (clusterd/config.py)."""
    source = getattr(options, "sources", {}).get(opt, "command line")
    from_file = source not in ("command line", "default") and not source.startswith("$")
    if from_file and os.environ.get(env):
        return None
    return options[opt]


def load_tasks(modules: list[str]) -> Any:
    """The task registry: the built-in tasks plus each ``--tasks`` module's; a module that
    cannot be loaded stops the start with one line (exit 1) saying what was tried: the module
    names and the ``sys.path`` they were looked for on (the usual cause is a missing
    PYTHONPATH)."""
    import sys

    from clusterd.tasks import load_registry

    try:
        return load_registry(modules)
    except Exception as e:
        tried = ", ".join(modules) or "(none)"
        # SystemExit, not a UsageError: twistd prints its whole usage text before a UsageError,
        # burying the one line that says what went wrong.
        raise SystemExit(
            f"clusterd: cannot load tasks: {type(e).__name__}: {e} (tried --tasks {tried}; "
            f"sys.path: {os.pathsep.join(p or '.' for p in sys.path)})"
        ) from e
