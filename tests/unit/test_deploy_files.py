"""Issue 12 item 8: deploy/ (Compose, Kubernetes, .dockerignore, .gitignore, README) parses and
lines up: names, ports, probes, secret files, the journal's volume, and the README's commands."""

from __future__ import annotations

import fnmatch
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path, PurePosixPath

import pytest
import yaml
from twisted.internet.testing import MemoryReactorClock

from clusterd.server.tap import Options as ServerOptions
from clusterd.server.tap import makeService
from clusterd.worker.tap import Options as WorkerOptions

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
README = (DEPLOY / "README.md").read_text()
SECRET = {"client.secret": "c" * 32, "worker.secret": "w" * 32}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No CLUSTERD_* variable of the machine running the tests leaks into these."""
    import os

    for name in list(os.environ):
        if name.startswith("CLUSTERD_"):
            monkeypatch.delenv(name)


def _k8s() -> dict[tuple[str, str], dict]:
    """Every Kubernetes object in deploy/k8s/, by (kind, name)."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in objects, f"{key} defined twice"
            objects[key] = doc
    return objects


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _container(workload: dict) -> dict:
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


def _volume(workload: dict, name: str) -> dict:
    (volume,) = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == name]
    return volume


def _mount(container: dict, path: str) -> dict:
    """The volume mount holding ``path`` (the longest mount path that contains it)."""
    mounts = [
        m
        for m in container["volumeMounts"]
        if PurePosixPath(path).is_relative_to(PurePosixPath(m["mountPath"]))
    ]
    assert mounts, f"{path} is on no volume"
    return max(mounts, key=lambda m: len(m["mountPath"]))


def _port(endpoint: str) -> int:
    return int(endpoint.split(":")[1])


SERVER = ("StatefulSet", "clusterd-server")
WORKER = ("Deployment", "clusterd-worker")
SERVICE = ("Service", "clusterd-server")


def test_every_manifest_and_the_compose_file_parse():
    """deploy/k8s/ holds the ConfigMap, the server's Service and StatefulSet and the workers'
    Deployment, whose selectors match their pods; compose.yaml parses."""
    objects = _k8s()
    assert set(objects) == {("ConfigMap", "clusterd-config"), SERVICE, SERVER, WORKER}
    server, worker, service = objects[SERVER], objects[WORKER], objects[SERVICE]
    assert server["spec"]["replicas"] == 1 and server["spec"]["serviceName"] == "clusterd-server"
    for workload in (server, worker):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert (
        service["spec"]["selector"].items()
        <= server["spec"]["template"]["metadata"]["labels"].items()
    )
    assert (
        not service["spec"]["selector"].items()
        <= worker["spec"]["template"]["metadata"]["labels"].items()
    )
    assert set(_compose()["services"]) == {"server", "worker"}


def _config_files(tmp_path: Path, workload: dict) -> list[str]:
    """The container's args with the ConfigMap's files and the Secret's written under
    tmp_path in place of their mount paths (as the kubelet would mount them)."""
    objects = _k8s()
    container = _container(workload)
    data = objects["ConfigMap", "clusterd-config"]["data"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    remap = {}
    for volume in ("config", "secrets"):
        spec = _volume(workload, volume)
        target = tmp_path / volume
        target.mkdir()
        for item in (spec.get("configMap") or spec.get("secret"))["items"]:
            text = data[item["key"]] if volume == "config" else SECRET[item["key"]]
            (target / item["path"]).write_text(text)
        remap[mounts[volume] + "/"] = f"{target}/"
    for path in (tmp_path / "config").iterdir():
        text = path.read_text()
        for old, new in remap.items():
            text = text.replace(old, new)
        path.write_text(text)
    args = []
    for arg in container["args"]:
        for old, new in remap.items():
            arg = arg.replace(old, new)
        args.append(arg)
    return args


class _Reactor(MemoryReactorClock):
    """A memory reactor with the thread pool makeService asks for (never used here)."""

    def getThreadPool(self):
        return None


def test_configmap_tomls_start_the_real_server_and_worker(tmp_path):
    """The StatefulSet's args with the ConfigMap's server.toml and the Secret's files parse
    with the server's real Options and bind 0.0.0.0 on the Service's line and http ports; the
    workers' worker.toml parses and connects to that Service's line port."""
    objects = _k8s()
    (tmp_path / "s").mkdir()
    (tmp_path / "w").mkdir()
    args = _config_files(tmp_path / "s", objects[SERVER])
    assert args[0] == "clusterd-server"
    options = ServerOptions()
    options.parseOptions([*args[1:], "--journal", "none"])
    assert set(options.secrets) == {"client", "worker"}
    ports = {p["name"]: p["port"] for p in objects[SERVICE]["spec"]["ports"]}
    reactor = _Reactor()
    service = makeService(options, reactor)
    service.startService()
    try:
        bound = sorted((port, iface) for port, _f, _b, iface in reactor.tcpServers)
    finally:
        service.stopService()
    assert bound == [(ports["line"], "0.0.0.0"), (ports["http"], "0.0.0.0")]
    args = _config_files(tmp_path / "w", objects[WORKER])
    assert args[0] == "clusterd-worker"
    worker = WorkerOptions()
    worker.parseOptions(args[1:])
    assert worker.secret == SECRET["worker.secret"].encode()
    assert worker["connect"] == f"tcp:{objects[SERVICE]['metadata']['name']}:{ports['line']}"


def _server_toml() -> dict:
    import tomllib

    return tomllib.loads(_k8s()["ConfigMap", "clusterd-config"]["data"]["server.toml"])


def test_service_ports_match_container_ports_and_the_toml():
    """The Service's line and http ports target the container's named ports, which are the
    ports of server.toml's listen and http endpoints."""
    objects = _k8s()
    container = {p["name"]: p["containerPort"] for p in _container(objects[SERVER])["ports"]}
    service = {p["name"]: p for p in objects[SERVICE]["spec"]["ports"]}
    assert set(service) == set(container) == {"line", "http"}
    for name, port in service.items():
        assert port["targetPort"] == name and port["port"] == container[name]
    toml = _server_toml()
    assert [_port(e) for e in toml["listen"]] == [container["line"]] == [7420]
    assert _port(toml["http"]) == container["http"] == 7421


def test_probes_hit_healthz_on_the_http_port():
    """The server's readiness and liveness probes GET /healthz on the container's http port."""
    container = _container(_k8s()[SERVER])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}


@pytest.mark.parametrize(
    ("workload", "toml", "keys"),
    [
        (SERVER, "server.toml", ("client-secret-file", "worker-secret-file")),
        (WORKER, "worker.toml", ("secret-file",)),
    ],
)
def test_secret_mounts_match_the_secret_file_paths(workload, toml, keys):
    """Each *-secret-file in the ConfigMap's TOML is a file the Secret mounts, and the README's
    kubectl create secret makes exactly the Secret's keys."""
    import tomllib

    objects = _k8s()
    settings = tomllib.loads(objects["ConfigMap", "clusterd-config"]["data"][toml])
    container = _container(objects[workload])
    assert container["args"] == [
        f"clusterd-{workload[1].split('-')[1]}",
        "--config",
        f"/etc/clusterd/{toml}",
    ]
    created = re.search(r"kubectl create secret generic (\S+) (.*)", README)
    for key in keys:
        path = PurePosixPath(settings[key])
        mount = _mount(container, str(path))
        secret = _volume(objects[workload], mount["name"])["secret"]
        assert secret["secretName"] == created.group(1)
        items = {i["path"]: i["key"] for i in secret["items"]}
        assert str(path.relative_to(mount["mountPath"])) in items
    assert re.findall(r"--from-file=(\S+)", created.group(2)) == sorted(SECRET)
    config = _mount(container, f"/etc/clusterd/{toml}")
    assert _volume(objects[workload], config["name"])["configMap"]["name"] == "clusterd-config"


def test_the_journal_is_on_the_volume():
    """The server's journal path, relative to its working directory, is on the StatefulSet's
    volumeClaimTemplate and on Compose's named volume."""
    server = _k8s()[SERVER]
    container = _container(server)
    journal = PurePosixPath(container["workingDir"]) / _server_toml()["journal"]
    (claim,) = server["spec"]["volumeClaimTemplates"]
    assert _mount(container, str(journal))["name"] == claim["metadata"]["name"]
    import tomllib

    compose = _compose()
    # The image's last WORKDIR is the server's working directory.
    workdir = re.findall(r"^WORKDIR (\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M)[-1]
    journal = (
        PurePosixPath(workdir) / tomllib.loads((DEPLOY / "server.toml").read_text())["journal"]
    )
    volumes = dict(v.split(":", 1) for v in compose["services"]["server"]["volumes"])
    (volume,) = [name for name, at in volumes.items() if journal.is_relative_to(at)]
    assert volume in compose["volumes"]


def test_compose_builds_one_image_and_scales_workers():
    """One build (the server's), one image for all; the worker service has no fixed name,
    container name or host port, so --scale worker=N works."""
    services = _compose()["services"]
    assert "build" in services["server"] and "build" not in services["worker"]
    assert services["server"]["image"] == services["worker"]["image"]
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert "--name" not in worker["command"]
    assert worker["depends_on"]["server"]["condition"] == "service_healthy"


def _healthcheck_url() -> tuple[list[str], str]:
    server = _compose()["services"]["server"]
    test = server["healthcheck"]["test"]
    assert test[0] == "CMD"
    (url,) = re.findall(r"http://[^'\"]+", test[-1])
    return test[1:], url


def test_compose_healthcheck_asks_healthz_on_the_served_http_port():
    """The healthcheck's URL is /healthz on the port Compose serves the HTTP API on."""
    server = _compose()["services"]["server"]
    _argv, url = _healthcheck_url()
    assert url == f"http://127.0.0.1:{_port(server['environment']['CLUSTERD_HTTP'])}/healthz"
    assert f"127.0.0.1:{_port(server['environment']['CLUSTERD_HTTP'])}:" in " ".join(
        server["ports"]
    )


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_compose_healthcheck_command_follows_the_status(status, healthy):
    """The healthcheck command, run with this python, exits 0 on 200 and non-zero on 503."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        argv, url = _healthcheck_url()
        assert argv[0] == "python"
        code = argv[-1].replace(url, f"http://127.0.0.1:{httpd.server_port}/healthz")
        proc = subprocess.run([sys.executable, *argv[1:-1], code], timeout=30, capture_output=True)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert (proc.returncode == 0) is healthy


@pytest.mark.parametrize(
    "name",
    [
        "clusterd-journal.sqlite",
        "clusterd-journal.sqlite-wal",
        "clusterd-journal.sqlite-shm",
        "clusterd-journal.sqlite.lock",
    ],
)
def test_gitignore_covers_the_default_journal_files(name):
    """git ignores the default journal and its WAL, shared-memory and lock files."""
    proc = subprocess.run(["git", "check-ignore", "--no-index", "-q", name], cwd=REPO, timeout=30)
    assert proc.returncode == 0, f"{name} is not ignored"


def test_dockerignore_keeps_junk_out_and_the_sources_in():
    """.dockerignore excludes the venv, .git, caches, journals, bench results and secrets,
    and nothing the Dockerfile needs."""
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not [p for p in patterns if p.startswith("!")]

    def ignored(path: str) -> bool:
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, p) or fnmatch.fnmatch(prefix, p.removeprefix("**/"))
            for p in patterns
            for prefix in prefixes
        )

    for junk in (".venv/bin/python", ".git/HEAD", "clusterd/__pycache__/x.pyc", ".pytest_cache",
                 ".ruff_cache", ".hypothesis", "bench/results/r.json", "clusterd-journal.sqlite",
                 "clusterd-journal.sqlite-wal", "x.journal", "deploy/client.secret",
                 "secrets.env", "clusterd.egg-info/PKG-INFO"):  # fmt: skip
        assert ignored(junk), junk
    needed = ["pyproject.toml", "setup.cfg", "README.md", "clusterd/__init__.py",
              "twisted/plugins/clusterd_server.py", "deploy/server.toml", "deploy/worker.toml"]  # fmt: skip
    for path in needed:
        assert (REPO / path).exists() or path.startswith("twisted/plugins/"), path
        assert not ignored(path), path


def test_readme_names_files_and_objects_that_exist():
    """Every deploy/ path and Kubernetes object the README's commands name exists, and its
    --scale names a Compose service."""
    for path in set(re.findall(r"\bdeploy/[\w./@-]*\w", README)):
        assert (REPO / path).exists(), path
    for name in re.findall(r"`(k8s/[\w.-]+)`", README):
        assert (DEPLOY / name).exists(), name
    objects = _k8s()
    kinds = {"statefulset": "StatefulSet", "deployment": "Deployment", "service": "Service"}
    for kind, name in re.findall(r"\b(statefulset|deployment|service)/([\w-]+)", README):
        assert (kinds[kind], name) in objects, (kind, name)
    for service in re.findall(r"--scale (\w+)=", README):
        assert service in _compose()["services"]
    (claim,) = objects[SERVER]["spec"]["volumeClaimTemplates"]
    assert f"kubectl delete pvc {claim['metadata']['name']}-clusterd-server-0" in README
    assert "{.data.client\\.secret}" in README
    for image in re.findall(r"docker build -f deploy/Dockerfile -t (\S+) \.", README):
        assert image.split(":")[0] == "clusterd"
    assert _container(objects[SERVER])["image"] == _compose()["services"]["server"]["image"]
