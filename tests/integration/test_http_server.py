"""The HTTP API of a real twistd server (``--http tcp:0``): real treq, the docs' curl examples,
and schemathesis against the served OpenAPI document."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import requests
from conftest import SUPPORT, TEST_TASKS

from clusterd.launch import LocalCluster

DOCS = Path(__file__).resolve().parents[2] / "docs"
pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def http(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, str]]:
    """A server with --http on a loopback port of its choosing and one two-slot worker; yields
    the cluster and the API's base URL, read from the server's log line."""
    cluster = LocalCluster(
        tmp_path_factory.mktemp("http"),
        server_args=[*TEST_TASKS, "--http", "tcp:0:interface=127.0.0.1"],
        env={"PYTHONPATH": SUPPORT},
    )
    try:
        cluster.start_server()
        line = cluster.wait_log("server", r"clusterd http listening on [0-9.]+:\d+")
        address = line.rsplit(" ", 1)[1]
        cluster.start_worker("w1", slots=2, extra=TEST_TASKS)
        cluster.wait_workers()
        yield cluster, f"http://{address}"
    finally:
        cluster.stop()


def _curl(command: str, base: str) -> str:
    """Run one ``curl -s [-X M] [-H h] [-d body] URL`` example with requests (the same request,
    without needing curl installed); returns the body as curl prints it."""
    args = shlex.split(command)[2:]
    method, headers, data, url = "GET", {}, None, ""
    while args:
        arg = args.pop(0)
        if arg == "-X":
            method = args.pop(0)
        elif arg == "-H":
            name, _, value = args.pop(0).partition(":")
            headers[name] = value.strip()
        elif arg == "-d":
            data = args.pop(0)
        else:
            url = arg.replace("http://127.0.0.1:7421", base)
    return requests.request(method, url, headers=headers, data=data, timeout=30).text


def _examples() -> list[tuple[str, str]]:
    """The (command, expected output) pairs of docs/HTTP.md's console block."""
    text = (DOCS / "HTTP.md").read_text()
    block = text.split("```console\n", 1)[1].split("```", 1)[0]
    pairs = []
    for chunk in block.split("$ ")[1:]:
        command, _, expected = chunk.partition("\n")
        pairs.append((command, expected.strip()))
    return pairs


def test_the_docs_curl_examples_answer_as_shown(http: tuple[LocalCluster, str]) -> None:
    """Every curl example in docs/HTTP.md, run against the server, prints what the docs show
    (``...`` standing for any text)."""
    _, base = http
    examples = _examples()
    assert len(examples) >= 6
    for command, expected in examples:
        got = _curl(command, base).strip()
        pattern = ".*".join(re.escape(part) for part in expected.split("..."))
        assert re.fullmatch(pattern, got, re.DOTALL), (command, got)


@pytest_twisted.ensureDeferred
async def test_real_treq_submits_streams_and_scrapes(http: tuple[LocalCluster, str]) -> None:
    """Real treq against the real server: submit (201), the job's event stream to its end,
    its status, and /metrics counting it."""
    import treq

    _, base = http
    response = await treq.post(
        f"{base}/api/v1/jobs", json={"task": "sum", "input": list(range(100))}
    )
    assert response.code == 201
    job_id = (await response.json())["id"]
    response = await treq.get(f"{base}/api/v1/jobs/{job_id}/events")
    assert response.headers.getRawHeaders("content-type") == ["text/event-stream"]
    stream = (await response.text()).strip().split("\n\n")
    assert stream[-1].startswith("event: end\ndata: ")
    end = json.loads(stream[-1].split("data: ", 1)[1])
    assert end["state"] == "done" and end["result"] == sum(range(100))
    status = await (await treq.get(f"{base}/api/v1/jobs/{job_id}")).json()
    assert status["result"] == sum(range(100))
    metrics = await (await treq.get(f"{base}/metrics")).text()
    done = re.search(r"^clusterd_jobs_done_total (\S+)$", metrics, re.M)
    assert done is not None and float(done.group(1)) >= 1


def test_served_openapi_document_is_docs_openapi_json(http: tuple[LocalCluster, str]) -> None:
    """/api/v1/openapi.json is exactly docs/openapi.json."""
    _, base = http
    served = requests.get(f"{base}/api/v1/openapi.json", timeout=30).json()
    assert served == json.loads((DOCS / "openapi.json").read_text())


def test_schemathesis_finds_no_server_error_nor_schema_break(
    http: tuple[LocalCluster, str],
) -> None:
    """schemathesis generates requests for every operation of the served document (bounded:
    25 examples each, derandomized, no shrinking) and finds no 5xx and no answer outside the schema."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    _, base = http
    schema = schemathesis.openapi.from_url(f"{base}/api/v1/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    tried = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path == "/api/v1/jobs/{id}/events":
            continue  # a stream lasts as long as its job: tested above and with StubTreq

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def check(case: Any) -> None:
            case.call_and_validate(base_url=base, checks=checks, timeout=30)

        check()
        tried += 1
    assert tried >= 8
