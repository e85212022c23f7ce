"""Options from three places besides the command line: a TOML file and ``CLUSTERD_*`` variables.

The server's and the worker's twistd options both derive from :class:`LayeredOptions`, so every
option there can be set in one of four places, the first that gives it winning:

1. the command line (``--max-line 1048576``);
2. the environment: ``CLUSTERD_`` + the option's name upper-cased, dashes as underscores
   (``CLUSTERD_MAX_LINE=1048576``, ``CLUSTERD_LISTEN=tcp:7420,unix:/run/c.sock``);
3. the TOML file named by ``--config PATH`` (or ``$CLUSTERD_CONFIG``), keyed by the option's
   name (``max-line = 1048576``, ``listen = ["tcp:7420", "unix:/run/c.sock"]``);
4. the option's default.

Repeatable options (``listen``, ``tasks``) take a TOML list of strings, or a comma list in the
environment; a layer's list replaces a lower layer's, it does not add to it. Flags take a TOML
boolean, or ``1/true/yes/on`` and ``0/false/no/off`` in the environment. Every value goes
through the option's own checker, so a bad value in any layer fails the same way. An unknown
key in the file, or a bad value anywhere, is a usage error naming the key and where it came
from: twistd prints it and exits non-zero before anything starts. Unknown ``CLUSTERD_*``
variables are left alone (the environment is shared with the ``clusterd`` client, whose
``$CLUSTERD_SECRET`` and ``$CLUSTERD_SERVER`` mean something else).

Which options the command line gave is recorded as twisted.python.usage dispatches them (each
handler wrapped in ``__init__``); comparing against defaults instead could not tell
``--max-line 65536`` from no ``--max-line`` at all.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

from twisted.python import reflect, usage

__all__ = ["LayeredOptions", "env_name", "choice", "LOG_LEVELS", "LOG_FORMATS"]

ENV_PREFIX = "CLUSTERD_"
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("text", "json")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
# Options that are not settings: twistd's own, and --config (a file naming a file is a loop).
_NOT_SETTINGS = {"help", "version", "config"}


def env_name(option: str) -> str:
    """The environment variable for ``option``: ``max-line`` -> ``CLUSTERD_MAX_LINE``."""
    return ENV_PREFIX + option.upper().replace("-", "_")


def choice(*allowed: str) -> Callable[[str], str]:
    """A checker accepting one of ``allowed`` (for optParameters and the layers alike)."""

    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, not {value!r}")
        return value

    check.coerceDoc = f"One of: {', '.join(allowed)}."  # type: ignore[attr-defined]
    return check


class LayeredOptions(usage.Options):
    """usage.Options whose settings may also come from ``$CLUSTERD_*`` and a TOML file.

    Subclasses list their repeatable options (kept in ``self[name]`` as lists by ``opt_NAME``)
    in ``listOptions`` and call ``super().postOptions()`` first in their own ``postOptions``.
    Afterwards ``self.sources[name]`` says where each setting came from: ``"command line"``,
    ``"$CLUSTERD_..."``, the config file's path, or ``"default"``.
    """

    listOptions: tuple[str, ...] = ()
    optParameters = [
        [
            "log-level",
            None,
            "info",
            "Least severe log events written: debug, info, warn or error.",
            choice(*LOG_LEVELS),
        ],
        [
            "log-format",
            None,
            "text",
            "text: twistd's lines; json: one JSON object per line, each event's fields (job_id, "
            'worker, ...) as keys (README, "Configuration").',
            choice(*LOG_FORMATS),
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        for name in self.listOptions:
            self[name] = []
        self.given: set[str] = set()
        self.sources: dict[str, str] = {}
        self._handlers = dict(self._dispatch)
        for name, handler in self._handlers.items():
            self._dispatch[name] = self._recorder(name, handler)

    def _recorder(self, name: str, handler: Any) -> Callable[[str, Any], None]:
        """``handler`` (a CoerceParameter or an ``opt_`` method), noting ``name`` as given."""

        def record(option: str, value: Any) -> None:
            self.given.add(name)
            if isinstance(handler, usage.CoerceParameter):
                handler.dispatch(option, value)
            else:
                handler(option, value)

        return record

    def opt_config(self, path: str) -> None:
        """TOML file with settings keyed by option name (command line and $CLUSTERD_* win).
        Also read from $CLUSTERD_CONFIG."""
        self["config"] = path

    def settings(self) -> dict[str, str]:
        """Every setting name -> its kind: ``"param"``, ``"flag"`` or ``"list"``."""
        params: list[Any] = []
        flags: list[Any] = []
        reflect.accumulateClassList(type(self), "optParameters", params)
        reflect.accumulateClassList(type(self), "optFlags", flags)
        kinds = {p[0]: "param" for p in params}
        kinds.update({f[0]: "flag" for f in flags})
        kinds.update({n: "list" for n in self.listOptions})
        return {k: v for k, v in kinds.items() if k not in _NOT_SETTINGS}

    def postOptions(self) -> None:
        """Fill what the command line did not give from the environment, then the file."""
        kinds = self.settings()
        path = self.get("config") or os.environ.get(env_name("config")) or None
        from_file = _read_toml(path, kinds) if path else {}
        for name, kind in kinds.items():
            if name in self.given:
                self.sources[name] = "command line"
                continue
            var = env_name(name)
            raw = os.environ.get(var)
            if raw is not None and raw != "":
                self._set(name, kind, raw, f"${var}", from_env=True)
            elif name in from_file:
                self._set(name, kind, from_file[name], str(path), from_env=False)
            else:
                self.sources[name] = "default"
        self["config"] = path
        from clusterd.logs import use_for_twistd

        use_for_twistd(self)

    def _set(self, name: str, kind: str, raw: Any, where: str, from_env: bool) -> None:
        """Check ``raw`` as the option ``name`` would be checked, and store it."""
        try:
            if kind == "list":
                value: Any = _as_list(raw, from_env)
            elif kind == "flag":
                value = _as_flag(raw, from_env)
            else:
                value = self._coerce(name, raw, from_env)
        except (ValueError, TypeError) as e:
            raise usage.UsageError(f"{where}: bad value for {name!r}: {e}") from None
        self[name] = value
        self.sources[name] = where

    def _coerce(self, name: str, raw: Any, from_env: bool) -> Any:
        """A parameter's value through its own checker (``str`` when it has none)."""
        handler = self._handlers.get(name)
        coerce = handler.coerce if isinstance(handler, usage.CoerceParameter) else str
        if not from_env:
            if isinstance(raw, bool) or not isinstance(raw, str | int | float):
                raise TypeError(f"expected a string or a number, got {_toml_type(raw)}")
            if coerce is str and not isinstance(raw, str):
                raise TypeError(f"expected a string, got {_toml_type(raw)}")
        return coerce(str(raw))


def _read_toml(path: str, kinds: Mapping[str, str]) -> dict[str, Any]:
    """The file's settings; an unreadable file, bad TOML or an unknown key is a usage error."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as e:
        raise usage.UsageError(f"--config {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise usage.UsageError(f"--config {path}: not valid TOML: {e}") from None
    for key in data:
        if key not in kinds:
            near = difflib.get_close_matches(key, kinds, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise usage.UsageError(f"{path}: unknown key {key!r}{hint}")
    return data


def _as_list(raw: Any, from_env: bool) -> list[str]:
    """A repeatable option's values: a comma list from the environment, a TOML list of strings."""
    if from_env:
        return [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise TypeError(f"expected a list of strings, got {_toml_type(raw)}")
    return list(raw)


def _as_flag(raw: Any, from_env: bool) -> bool:
    """A flag's value: a TOML boolean, or one of the usual words in the environment."""
    if not from_env:
        if not isinstance(raw, bool):
            raise TypeError(f"expected true or false, got {_toml_type(raw)}")
        return raw
    word = raw.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(f"expected one of {', '.join(sorted(_TRUE | _FALSE))}, got {raw!r}")


def _toml_type(value: Any) -> str:
    """What a TOML value is, in words for an error message."""
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names.update({list: "a list", dict: "a table"})
    return names.get(type(value), type(value).__name__)
