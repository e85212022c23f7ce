"""Settings from the command line, ``$CLUSTERD_*`` and a TOML file (clusterd/config.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from twisted.python import usage

from clusterd.server.tap import Options as ServerOptions
from clusterd.worker.tap import Options as WorkerOptions

README = Path(__file__).resolve().parents[2] / "README.md"
SECRET = "s" * 32


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No CLUSTERD_* variable of the machine running the tests leaks into these."""
    import os

    for name in list(os.environ):
        if name.startswith("CLUSTERD_"):
            monkeypatch.delenv(name)


def parse(cls, args, tmp_path=None, toml=None):
    """``cls`` parsed from ``args``, with ``toml`` written to a config file first."""
    if toml is not None:
        path = tmp_path / "c.toml"
        path.write_text(toml)
        args = ["--config", str(path), *args]
    options = cls()
    options.parseOptions(args)
    return options


def test_command_line_beats_environment_beats_file_beats_default(tmp_path, monkeypatch):
    """Each setting comes from the first layer that gives it: CLI, then env, then file."""
    monkeypatch.setenv("CLUSTERD_MAX_LINE", "2000")
    monkeypatch.setenv("CLUSTERD_RETENTION", "20")
    toml = "max-line = 1000\nretention = 10.0\nheartbeat-interval = 2\n"
    o = parse(ServerOptions, ["--max-line", "3000"], tmp_path, toml)
    assert (o["max-line"], o["retention"], o["heartbeat-interval"]) == (3000, 20.0, 2.0)
    assert o["max-queued"] == 1_000_000
    assert o.sources["max-line"] == "command line"
    assert o.sources["retention"] == "$CLUSTERD_RETENTION"
    assert o.sources["heartbeat-interval"] == str(tmp_path / "c.toml")
    assert o.sources["max-queued"] == "default"


def test_a_command_line_value_equal_to_the_default_still_beats_the_file(tmp_path):
    """Given on the command line is tracked per option, not guessed by comparing to defaults."""
    o = parse(ServerOptions, ["--max-line", "1048576"], tmp_path, "max-line = 4096\n")
    assert o["max-line"] == 1048576


def test_config_path_may_come_from_the_environment(tmp_path, monkeypatch):
    """$CLUSTERD_CONFIG names the file when --config is not given."""
    (tmp_path / "w.toml").write_text('connect = "tcp:10.0.0.5:7420"\nslots = 3\n')
    monkeypatch.setenv("CLUSTERD_CONFIG", str(tmp_path / "w.toml"))
    o = parse(WorkerOptions, [])
    assert (o["connect"], o["slots"]) == ("tcp:10.0.0.5:7420", 3)


def test_an_unknown_key_in_the_file_is_a_usage_error_naming_it(tmp_path):
    """A misspelt key stops the start, naming the key and suggesting the near one."""
    with pytest.raises(usage.UsageError, match=r"unknown key 'max-lines'.*'max-line'"):
        parse(ServerOptions, [], tmp_path, "max-lines = 10\n")


@pytest.mark.parametrize(
    ("toml", "pattern"),
    [
        ("max-line = 0\n", r"c\.toml: bad value for 'max-line': must be a positive"),
        ('max-line = "lots"\n', r"bad value for 'max-line'"),
        ("journal = 5\n", r"bad value for 'journal': expected a string"),
        ('insecure = "yes"\n', r"bad value for 'insecure': expected true or false"),
        ('listen = "tcp:7420"\n', r"bad value for 'listen': expected a list of strings"),
        ('log-level = "loud"\n', r"bad value for 'log-level': must be one of debug"),
        ("max-line = [\n", r"not valid TOML"),
    ],
)
def test_a_bad_value_in_the_file_is_a_usage_error_naming_the_key(tmp_path, toml, pattern):
    """Each wrong value or type in the file fails at start with the key in the message."""
    with pytest.raises(usage.UsageError, match=pattern):
        parse(ServerOptions, [], tmp_path, toml)


def test_a_bad_value_in_the_environment_names_the_variable(monkeypatch):
    """A bad $CLUSTERD_* value fails at start, naming the variable and the option."""
    monkeypatch.setenv("CLUSTERD_SLOTS", "-2")
    with pytest.raises(usage.UsageError, match=r"\$CLUSTERD_SLOTS: bad value for 'slots'"):
        parse(WorkerOptions, [])
    monkeypatch.setenv("CLUSTERD_SLOTS", "2")
    monkeypatch.setenv("CLUSTERD_SPECULATE", "maybe")
    with pytest.raises(usage.UsageError, match=r"CLUSTERD_SPECULATE: bad value for 'speculate'"):
        parse(ServerOptions, [])


def test_a_missing_config_file_is_a_usage_error():
    """--config naming no file stops the start with the path."""
    with pytest.raises(usage.UsageError, match=r"--config /nonexistent/c\.toml"):
        parse(ServerOptions, ["--config", "/nonexistent/c.toml"])


def test_list_options_take_a_toml_list_or_a_comma_list_and_a_layer_replaces(tmp_path, monkeypatch):
    """listen/tasks: TOML list, env comma list; the higher layer's list replaces the lower."""
    (tmp_path / "cfg_tasks_a.py").write_text("TASKS = []\n")
    (tmp_path / "cfg_tasks_b.py").write_text("TASKS = []\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    toml = 'listen = ["tcp:7001", "tcp:7002"]\ntasks = ["cfg_tasks_a"]\n'
    o = parse(ServerOptions, [], tmp_path, toml)
    assert o["listen"] == ["tcp:7001:interface=127.0.0.1", "tcp:7002:interface=127.0.0.1"]
    assert o["tasks"] == ["cfg_tasks_a"]
    monkeypatch.setenv("CLUSTERD_LISTEN", "tcp:7003, tcp:7004")
    monkeypatch.setenv("CLUSTERD_TASKS", "cfg_tasks_a,cfg_tasks_b")
    o = parse(ServerOptions, [], tmp_path, toml)
    assert o["listen"] == ["tcp:7003:interface=127.0.0.1", "tcp:7004:interface=127.0.0.1"]
    assert o["tasks"] == ["cfg_tasks_a", "cfg_tasks_b"]
    o = parse(ServerOptions, ["--listen", "tcp:7005"], tmp_path, toml)
    assert o["listen"] == ["tcp:7005:interface=127.0.0.1"]


def test_flags_come_from_the_file_and_the_environment(tmp_path, monkeypatch):
    """A TOML boolean or an env word sets a flag; the env beats the file."""
    assert parse(ServerOptions, [], tmp_path, "speculate = true\n")["speculate"] is True
    monkeypatch.setenv("CLUSTERD_SPECULATE", "off")
    assert parse(ServerOptions, [], tmp_path, "speculate = true\n")["speculate"] is False


def test_secrets_are_read_from_paths_in_the_file(tmp_path):
    """client-secret-file and worker-secret-file in the config load both secrets."""
    (tmp_path / "c.secret").write_text("c" * 32)
    (tmp_path / "w.secret").write_text("w" * 32)
    toml = (
        f'client-secret-file = "{tmp_path}/c.secret"\nworker-secret-file = "{tmp_path}/w.secret"\n'
    )
    o = parse(ServerOptions, [], tmp_path, toml)
    assert o.secrets == {"client": b"c" * 32, "worker": b"w" * 32}
    o = parse(WorkerOptions, [], tmp_path, f'secret-file = "{tmp_path}/w.secret"\n')
    assert o.secret == b"w" * 32


def test_a_secret_in_the_environment_beats_a_secret_path_in_the_file(tmp_path, monkeypatch):
    """$CLUSTERD_WORKER_SECRET outranks the file's worker-secret-file (env > file)."""
    (tmp_path / "w.secret").write_text("w" * 32)
    monkeypatch.setenv("CLUSTERD_WORKER_SECRET", SECRET)
    o = parse(ServerOptions, [], tmp_path, f'worker-secret-file = "{tmp_path}/w.secret"\n')
    assert o.secrets["worker"] == SECRET.encode()
    o = parse(ServerOptions, ["--worker-secret-file", f"{tmp_path}/w.secret"])
    assert o.secrets["worker"] == b"w" * 32


def test_an_unreadable_secret_path_in_the_file_is_a_usage_error(tmp_path):
    """A secret path in the config that cannot be read stops the start."""
    with pytest.raises(usage.UsageError, match="cannot read secret file"):
        parse(ServerOptions, [], tmp_path, 'client-secret-file = "/nonexistent/x"\n')


def _readme_toml(title: str) -> str:
    """The ```toml block after ``title`` in the README's configuration section."""
    text = README.read_text()
    m = re.search(re.escape(title) + r".*?```toml\n(.*?)```", text, re.S)
    assert m, f"README has no toml block after {title!r}"
    return m.group(1)


def test_the_readme_configuration_examples_load_and_validate(tmp_path, monkeypatch):
    """The README's server.toml and worker.toml parse with every key known and valid."""
    monkeypatch.chdir(tmp_path)
    for name in ("client.secret", "worker.secret"):
        (tmp_path / name).write_text("x" * 32)
    server_toml = _readme_toml("server.toml").replace("/etc/clusterd/", f"{tmp_path}/")
    o = parse(ServerOptions, [], tmp_path, server_toml)
    assert o.sources["max-line"] != "default" and set(o.secrets) == {"client", "worker"}
    worker_toml = _readme_toml("worker.toml").replace("/etc/clusterd/", f"{tmp_path}/")
    o = parse(WorkerOptions, [], tmp_path, worker_toml)
    assert o.secret == b"x" * 32 and o.sources["connect"] != "default"


@pytest.mark.parametrize("name", ["server.toml", "worker.toml"])
def test_the_deploy_config_files_load_and_validate(tmp_path, monkeypatch, name):
    """deploy/server.toml and deploy/worker.toml have only known keys with valid values."""
    deploy = README.parent / "deploy" / name
    monkeypatch.setenv("CLUSTERD_CLIENT_SECRET", SECRET)
    monkeypatch.setenv("CLUSTERD_WORKER_SECRET", SECRET)
    monkeypatch.setenv("CLUSTERD_SECRET", SECRET)
    cls = ServerOptions if name == "server.toml" else WorkerOptions
    o = parse(cls, ["--config", str(deploy)])
    assert o["config"] == str(deploy)
