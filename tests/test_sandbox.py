"""The Mirakl Connect sandbox, driven over real HTTP with httpx (no mocks)."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from relay.dev.sandbox.command import add_arguments, config_from_args
from relay.dev.sandbox.server import (
    DEFAULT_CLIENT_ID,
    DEFAULT_CLIENT_SECRET,
    DEFAULT_TOKEN,
    MAX_BODY_BYTES,
    SCOPE,
    Faults,
    Sandbox,
    SandboxConfig,
)
from relay.errors import ConfigError

AUTH = {"Authorization": f"Bearer {DEFAULT_TOKEN}"}
SUCCESS: dict[str, Any] = {"status": "SUCCESS"}
FAILED: dict[str, Any] = {
    "status": "FAILED",
    "errors": [{"code": "ORDER_IN_WRONG_STATE", "message": "shipped"}],
}
CREDENTIALS = {
    "grant_type": "client_credentials",
    "client_id": DEFAULT_CLIENT_ID,
    "client_secret": DEFAULT_CLIENT_SECRET,
}
ROOT = Path(__file__).resolve().parents[1]

StartSandbox = Callable[..., Sandbox]


def action_path(action_id: str) -> str:
    """One path segment, as the relay must send it (dots too, or httpx would resolve '..')."""
    return "/v1/orders/actions/" + quote(action_id, safe="").replace(".", "%2E")


@pytest.fixture
def start() -> Iterator[StartSandbox]:
    """Start sandboxes with SandboxConfig options; all are stopped after the test."""
    started: list[Sandbox] = []

    def _start(**options: Any) -> Sandbox:
        sandbox = Sandbox(SandboxConfig(**{"seed": 7, **options})).start()
        started.append(sandbox)
        return sandbox

    yield _start
    for sandbox in started:
        sandbox.stop()


@pytest.fixture
def sandbox(start: StartSandbox) -> Sandbox:
    return start()


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=5) as c:
        yield c


def put(client: httpx.Client, action_id: str, body: Any = SUCCESS, **kwargs: Any) -> httpx.Response:
    return client.put(action_path(action_id), json=body, **kwargs)


def fetch_token(client: httpx.Client, sandbox: Sandbox, **form: str) -> httpx.Response:
    return client.post(sandbox.token_url, data={**CREDENTIALS, **form}, headers={"Authorization": ""})


# -- updateActionStatus ------------------------------------------------------------------------


def test_a_new_action_is_applied_once_and_answered_204(sandbox: Sandbox, client: httpx.Client) -> None:
    answer = put(client, "accept-action-123", FAILED)

    assert answer.status_code == 204
    assert answer.content == b""
    assert sandbox.applied == {"accept-action-123": FAILED}
    assert sandbox.apply_count["accept-action-123"] == 1
    (record,) = sandbox.requests
    assert (record.method, record.action_id, record.status, record.fault) == (
        "PUT",
        "accept-action-123",
        204,
        None,
    )
    assert record.has_authorization


def test_a_repeat_is_refused_as_already_final_and_counted(sandbox: Sandbox, client: httpx.Client) -> None:
    assert put(client, "a1", SUCCESS).status_code == 204

    answer = put(client, "a1", FAILED)

    assert answer.status_code == 400
    assert answer.json()["code"] == "ACTION_ALREADY_FINAL"
    assert sandbox.applied["a1"] == SUCCESS
    assert sandbox.apply_count["a1"] == 1
    assert sandbox.duplicates == 1
    assert sandbox.duplicate_count["a1"] == 1
    assert sandbox.summary()["duplicates"] == 1


def test_every_documented_error_code_is_accepted(client: httpx.Client, sandbox: Sandbox) -> None:
    codes = [
        "OTHER",
        "CARRIER_NOT_SUPPORTED",
        "MISSING_CARRIER",
        "WAREHOUSE_ID_NOT_FOUND",
        "WAREHOUSE_ID_REQUIRED",
    ]
    body = {"status": "FAILED", "errors": [{"code": code, "message": "why"} for code in codes]}

    assert put(client, "multi", body).status_code == 204
    assert put(client, "success-empty-errors", {"status": "SUCCESS", "errors": []}).status_code == 204
    assert set(sandbox.applied) == {"multi", "success-empty-errors"}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", f"Basic {DEFAULT_TOKEN}", "Bearer", DEFAULT_TOKEN],
    ids=["missing", "wrong", "basic", "empty", "no-scheme"],
)
def test_a_put_without_a_valid_token_gets_401(sandbox: Sandbox, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    with httpx.Client(base_url=sandbox.url, headers=headers, timeout=5) as c:
        answer = put(c, "a1")

    assert answer.status_code == 401
    assert answer.json()["code"] == "UNAUTHORIZED"
    assert answer.json()["message"]
    assert sandbox.applied == {}
    assert sandbox.requests[0].has_authorization is (authorization is not None)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"status": "FAILED"}, "$.errors"),
        ({"status": "FAILED", "errors": []}, "$.errors"),
        ({"status": "SUCCESS", "errors": [{"code": "OTHER", "message": "x"}]}, "$.errors"),
        ({"status": "FAILED", "errors": [{"code": "NOT_A_CODE", "message": "x"}]}, "$.errors[0].code"),
        ({"status": "FAILED", "errors": [{"code": "OTHER", "message": ""}]}, "$.errors[0].message"),
        ({"status": "FAILED", "errors": [{"code": "OTHER"}]}, "$.errors[0].message"),
        ({"status": "FAILED", "errors": ["OTHER"]}, "$.errors[0]"),
        ({"status": "DONE"}, "$.status"),
        ([SUCCESS], "$"),
        (b"not json", "$"),
        (b"", "$"),
    ],
    ids=[
        "failed-no-errors",
        "failed-empty-errors",
        "success-with-errors",
        "unknown-code",
        "empty-message",
        "missing-message",
        "error-not-object",
        "bad-status",
        "array",
        "not-json",
        "empty",
    ],
)
def test_an_invalid_body_gets_400_invalid_input(
    sandbox: Sandbox, client: httpx.Client, body: Any, field: str
) -> None:
    if isinstance(body, bytes):
        answer = client.put(action_path("a1"), content=body, headers={"Content-Type": "application/json"})
    else:
        answer = put(client, "a1", body)

    assert answer.status_code == 400
    payload = answer.json()
    assert payload["code"] == "INVALID_INPUT"
    assert payload["message"]
    assert payload["errors"][0]["field"] == field
    assert payload["errors"][0]["message"]
    assert payload["errors"][0]["extensions"] == {}
    assert sandbox.applied == {}
    assert put(client, "a1").status_code == 204, "a refused body does not make the action final"


def test_an_unknown_action_gets_404_action_not_found(sandbox: Sandbox, client: httpx.Client) -> None:
    answer = put(client, "unknown-42")

    assert answer.status_code == 404
    assert answer.json()["code"] == "ACTION_NOT_FOUND"
    assert sandbox.applied == {}


def test_the_unknown_prefix_is_configurable_and_can_be_turned_off(start: StartSandbox) -> None:
    custom, off = start(unknown_prefix="gone:"), start(unknown_prefix="")
    with httpx.Client(headers=AUTH, timeout=5) as c:
        assert c.put(custom.url + action_path("gone:1"), json=SUCCESS).status_code == 404
        assert c.put(custom.url + action_path("unknown-1"), json=SUCCESS).status_code == 204
        assert c.put(off.url + action_path("unknown-1"), json=SUCCESS).status_code == 204


@pytest.mark.parametrize(
    "action_id",
    ["a/b", "q?x=1&y=2", "frag#1", "..", ".", "../../oauth/token", "é-ü-日本", "sp ace+plus", "100%", "%2F"],
)
def test_an_id_arrives_exactly_as_sent_decoded_once(
    sandbox: Sandbox, client: httpx.Client, action_id: str
) -> None:
    assert put(client, action_id).status_code == 204

    assert list(sandbox.applied) == [action_id]
    assert sandbox.requests[0].action_id == action_id


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("PUT", "/v1/orders/actions/a/b", 404, None),
        ("PUT", "/v1/orders/actions/a?x=1", 404, None),
        ("PUT", "/v1/orders/actions/", 404, None),
        ("PUT", "/v1/orders/actions", 404, None),
        ("PUT", "/v2/orders/actions/a", 404, None),
        ("GET", "/v1/orders/actions/a", 405, "PUT"),
        ("POST", "/v1/orders/actions/a", 405, "PUT"),
        ("GET", "/oauth/token", 405, "POST"),
        ("POST", "/_sandbox/summary", 405, "GET"),
    ],
)
def test_other_paths_and_methods_get_404_or_405_in_the_api_shape(
    sandbox: Sandbox, client: httpx.Client, method: str, path: str, status: int, allow: str | None
) -> None:
    answer = client.request(method, path, json=SUCCESS)

    assert answer.status_code == status
    assert set(answer.json()) == {"code", "message", "errors"}
    assert answer.headers.get("Allow") == allow
    assert sandbox.applied == {}


def test_a_keep_alive_connection_survives_refusals(sandbox: Sandbox) -> None:
    body = json.dumps(SUCCESS).encode()

    def request(action_id: str, token: str) -> bytes:
        return (
            f"PUT /v1/orders/actions/{action_id} HTTP/1.1\r\nHost: sandbox\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    with socket.create_connection(("127.0.0.1", sandbox.port), timeout=5) as conn:
        conn.sendall(
            request("a1", "wrong") + request("unknown-1", DEFAULT_TOKEN) + request("a1", DEFAULT_TOKEN)
        )
        reader = conn.makefile("rb")
        statuses = []
        for _ in range(3):
            statuses.append(reader.readline().split()[1])
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)

    assert statuses == [b"401", b"404", b"204"]
    assert list(sandbox.applied) == ["a1"]


def test_a_chunked_body_is_read(sandbox: Sandbox, client: httpx.Client) -> None:
    chunks = [b'{"status": ', b'"FAILED", "errors": [{"code": "OTHER", ', b'"message": "m"}]}']

    answer = client.put(
        action_path("chunked"), content=iter(chunks), headers={"Content-Type": "application/json"}
    )

    assert answer.status_code == 204
    assert sandbox.applied["chunked"]["errors"] == [{"code": "OTHER", "message": "m"}]


def test_an_oversized_or_malformed_body_is_refused_and_the_connection_closed(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    too_big = client.put(action_path("big"), content=b"x" * (MAX_BODY_BYTES + 1))
    bad_chunks = client.put(action_path("chunks"), content=iter([b"not", b"json"]), headers={"X": "y"})

    assert too_big.status_code == 413
    assert too_big.headers["Connection"] == "close"
    assert bad_chunks.status_code == 400
    assert sandbox.applied == {}


def test_64_keep_alive_connections_at_once(sandbox: Sandbox) -> None:
    failures: list[str] = []

    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)

    def worker(c: httpx.Client, n: int) -> None:
        for i in range(16):
            status = put(c, f"w{n}-{i}").status_code
            if status != 204:
                failures.append(f"w{n}-{i}: {status}")

    with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=10, limits=limits) as c:
        threads = [threading.Thread(target=worker, args=(c, n)) for n in range(64)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert failures == []
    summary = sandbox.summary()
    assert (summary["applied"], summary["max_apply_count"], summary["by_status"]) == (1024, 1, {"204": 1024})


# -- OAuth2 token endpoint ---------------------------------------------------------------------


def test_an_issued_token_is_accepted(sandbox: Sandbox, client: httpx.Client) -> None:
    answer = fetch_token(client, sandbox)

    assert answer.status_code == 200
    token = answer.json()
    assert token["token_type"] == "Bearer"
    assert token["expires_in"] == 3600
    assert token["scope"] == SCOPE
    assert answer.headers["Cache-Control"] == "no-store"
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    assert put(client, "a1", headers=bearer).status_code == 204
    assert sandbox.token_requests == 1


def test_http_basic_client_authentication_also_works(sandbox: Sandbox, client: httpx.Client) -> None:
    answer = client.post(
        sandbox.token_url,
        data={"grant_type": "client_credentials"},
        auth=(DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET),
    )

    assert answer.status_code == 200
    assert answer.json()["access_token"]


def test_an_issued_token_expires_after_its_lifetime(start: StartSandbox) -> None:
    sandbox = start(token_lifetime=1.0)
    with httpx.Client(base_url=sandbox.url, timeout=5) as c:
        issued_at = time.monotonic()
        token = fetch_token(c, sandbox).json()
        bearer = {"Authorization": f"Bearer {token['access_token']}"}
        assert token["expires_in"] == 1
        # An empty body is 400 while the token is good and 401 once it expired: poll the clock.
        while (status := put(c, "a1", {}, headers=bearer).status_code) == 400:
            assert time.monotonic() - issued_at < 3, "the token never expired"
            time.sleep(0.05)
        expired_after = time.monotonic() - issued_at

    assert status == 401
    assert expired_after >= 0.95
    assert sandbox.applied == {}


@pytest.mark.parametrize(
    ("form", "status", "error"),
    [
        ({"client_secret": "wrong"}, 401, "invalid_client"),
        ({"client_id": "someone-else"}, 401, "invalid_client"),
        ({"client_secret": ""}, 401, "invalid_client"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"grant_type": ""}, 400, "invalid_request"),
    ],
)
def test_a_bad_token_request_is_refused(
    sandbox: Sandbox, client: httpx.Client, form: dict[str, str], status: int, error: str
) -> None:
    answer = fetch_token(client, sandbox, **form)

    assert answer.status_code == status
    assert answer.json()["error"] == error
    assert "access_token" not in answer.json()


def test_the_token_endpoint_can_be_down(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.token_endpoint_down(True)
    down = fetch_token(client, sandbox)
    sandbox.token_endpoint_down(False)
    up = fetch_token(client, sandbox)

    assert down.status_code == 503
    assert down.json()["error"] == "temporarily_unavailable"
    assert up.status_code == 200
    assert sandbox.token_requests == 2


# -- faults and forced answers -----------------------------------------------------------------


def test_p503_answers_503_without_applying(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(p503=1.0))

    answer = put(client, "a1")

    assert answer.status_code == 503
    assert answer.json()["code"] == "UNAVAILABLE"
    assert sandbox.applied == {}
    assert sandbox.summary()["by_fault"] == {"503": 1}


def test_p429_answers_429_with_retry_after_without_applying(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(p429=1.0, retry_after=3))

    answer = put(client, "a1")

    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "3"
    assert answer.json()["code"] == "TOO_MANY_REQUEST"
    assert sandbox.applied == {}


def test_p_close_drops_the_connection_without_an_answer(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(p_close=1.0))

    with pytest.raises(httpx.RemoteProtocolError):
        put(client, "a1")

    assert sandbox.applied == {}
    assert (sandbox.requests[0].status, sandbox.requests[0].fault) == (None, "close")
    assert sandbox.summary()["by_status"] == {"no_answer": 1}


def test_p_apply_500_applies_then_answers_500(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.set_faults(Faults(p_apply_500=1.0))

    first = put(client, "a1")
    retry = put(client, "a1")

    assert first.status_code == 500
    assert retry.status_code == 400
    assert retry.json()["code"] == "ACTION_ALREADY_FINAL"
    assert sandbox.apply_count["a1"] == 1
    assert sandbox.fault_counts == {"apply_500": 1}, "only a request that really applies gets the fault"


def test_p_apply_hang_applies_then_never_answers(start: StartSandbox) -> None:
    sandbox = start(faults=Faults(p_apply_hang=1.0, hang_seconds=1.0))
    with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=0.2) as c, pytest.raises(httpx.ReadTimeout):
        put(c, "a1")

    assert sandbox.applied == {"a1": SUCCESS}


def test_faults_come_after_the_auth_check(sandbox: Sandbox) -> None:
    sandbox.set_faults(Faults(p503=1.0))
    with httpx.Client(base_url=sandbox.url, timeout=5) as c:
        assert put(c, "a1").status_code == 401
    assert sandbox.fault_counts == {}


def test_latency_delays_every_put(start: StartSandbox) -> None:
    sandbox = start(faults=Faults(latency=0.2))
    with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=5) as c:
        began = time.monotonic()
        assert put(c, "a1").status_code == 204
        assert time.monotonic() - began >= 0.2


def test_the_same_seed_draws_the_same_faults(start: StartSandbox) -> None:
    def statuses(sandbox: Sandbox) -> list[int]:
        with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=5) as c:
            return [put(c, f"a{i}").status_code for i in range(60)]

    faults = Faults(p503=0.3, p429=0.3)
    first = statuses(start(seed=11, faults=faults))
    again = statuses(start(seed=11, faults=faults))

    assert first == again
    assert {204, 429, 503} <= set(first)


def test_force_status_answers_every_put_without_applying(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.force_status(403)
    forbidden = put(client, "a1")
    sandbox.force_status(503)
    unavailable = put(client, "a1")
    sandbox.force_status(None)
    normal = put(client, "a1")

    assert (forbidden.status_code, forbidden.json()["code"]) == (403, "FORBIDDEN")
    assert (unavailable.status_code, unavailable.json()["code"]) == (503, "UNAVAILABLE")
    assert normal.status_code == 204
    assert sandbox.apply_count["a1"] == 1
    assert sandbox.fault_counts == {"forced_status": 2}


def test_probabilities_outside_0_to_1_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--p-close"):
        Faults(p_close=1.5)
    with pytest.raises(ConfigError, match="--p503"):
        Faults(p503=float("nan"))
    with pytest.raises(ConfigError, match="--p-apply-hang"):
        Faults(p_apply_hang=-0.1)


# -- state, reports, request log ---------------------------------------------------------------


def test_summary_and_applied_endpoints_report_without_counting_themselves(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    put(client, "a1")
    put(client, "a1")
    put(client, "unknown-1")
    fetch_token(client, sandbox)

    summary = client.get("/_sandbox/summary").json()
    applied = client.get("/_sandbox/applied").json()

    assert summary == {
        "requests": 4,
        "applied": 1,
        "duplicates": 1,
        "max_apply_count": 1,
        "token_requests": 1,
        "by_status": {"200": 1, "204": 1, "400": 1, "404": 1},
        "by_fault": {},
    }
    assert applied == {"count": 1, "applied": {"a1": 1}, "duplicates": {"a1": 1}}
    assert sandbox.summary() == summary


def test_reset_forgets_everything_recorded(sandbox: Sandbox, client: httpx.Client) -> None:
    put(client, "a1")
    put(client, "a1")

    sandbox.reset()

    assert sandbox.summary()["requests"] == 0
    assert (sandbox.applied, sandbox.requests, sandbox.duplicates) == ({}, [], 0)
    assert put(client, "a1").status_code == 204


def test_the_request_log_is_json_lines_without_secrets(start: StartSandbox, tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    sandbox = start(log_path=log)
    with httpx.Client(base_url=sandbox.url, timeout=5) as c:
        access_token = fetch_token(c, sandbox).json()["access_token"]
        put(c, "a1", headers={"Authorization": f"Bearer {access_token}"})
        put(c, "a2", headers=AUTH)
        c.post(f"{sandbox.token_url}?client_secret={DEFAULT_CLIENT_SECRET}", data=CREDENTIALS)
    sandbox.stop()

    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(line["method"], line["action_id"], line["status"]) for line in lines] == [
        ("POST", None, 200),
        ("PUT", "a1", 204),
        ("PUT", "a2", 204),
        ("POST", None, 404),
    ]
    assert all(line["has_authorization"] for line in lines[1:3])
    for secret in (access_token, DEFAULT_TOKEN, DEFAULT_CLIENT_SECRET):
        assert secret not in text


def test_stop_is_prompt_with_idle_and_hanging_connections(start: StartSandbox) -> None:
    sandbox = start(faults=Faults(p_apply_hang=1.0, hang_seconds=30.0))
    with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=0.2) as c:
        with pytest.raises(httpx.ReadTimeout):
            put(c, "a1")
        began = time.monotonic()
        sandbox.stop()
        assert time.monotonic() - began < 2
        with pytest.raises(httpx.ConnectError):
            put(c, "a2")


# -- command line ------------------------------------------------------------------------------


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_command_line_options_build_the_config() -> None:
    config = config_from_args(
        parse(
            "--port",
            "0",
            "--token",
            "t1",
            "--token",
            "t2",
            "--oauth-client",
            "id:se:cret",
            "--token-lifetime",
            "2.5",
            "--unknown-prefix",
            "x-",
            "--p503",
            "0.1",
            "--p429",
            "0.2",
            "--retry-after",
            "4",
            "--p-close",
            "0.3",
            "--p-apply-500",
            "0.4",
            "--p-apply-hang",
            "0.5",
            "--hang-seconds",
            "6",
            "--latency-ms",
            "250",
            "--seed",
            "9",
        )
    )

    assert config.tokens == ("t1", "t2")
    assert dict(config.oauth_clients) == {"id": "se:cret"}
    assert (config.port, config.token_lifetime, config.unknown_prefix, config.seed) == (0, 2.5, "x-", 9)
    assert config.faults == Faults(
        p503=0.1,
        p429=0.2,
        retry_after=4,
        p_close=0.3,
        p_apply_500=0.4,
        p_apply_hang=0.5,
        hang_seconds=6.0,
        latency=0.25,
    )
    defaults = config_from_args(parse())
    assert (defaults.port, defaults.tokens) == (8080, (DEFAULT_TOKEN,))
    assert dict(defaults.oauth_clients) == {DEFAULT_CLIENT_ID: DEFAULT_CLIENT_SECRET}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--p503", "1.5"], "--p503: expected a probability between 0 and 1, got 1.5"),
        (["--p-apply-500", "-1"], "--p-apply-500"),
        (["--oauth-client", "no-secret"], "--oauth-client: expected ID:SECRET"),
        (["--latency-ms", "-5"], "--latency-ms"),
        (["--token-lifetime", "0"], "--token-lifetime"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_command_line_values_are_one_clear_config_error(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_args(parse(*argv))


def test_run_from_args_serves_until_sigterm_and_prints_a_summary() -> None:
    script = (
        "import argparse, sys\n"
        "from relay.dev.sandbox.command import add_arguments, run_from_args\n"
        "parser = argparse.ArgumentParser()\n"
        "add_arguments(parser)\n"
        "sys.exit(run_from_args(parser.parse_args(sys.argv[1:])))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-c", script, "--port", "0", "--token", "cli-token"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    ) as process:
        assert process.stdout is not None
        banner = process.stdout.readline()
        match = re.search(r"base URL (http://127\.0\.0\.1:\d+)", banner)
        assert match, banner
        url = match.group(1)
        assert f"token URL {url}/oauth/token" in banner
        assert "cli-token" in banner and f"{DEFAULT_CLIENT_ID}:{DEFAULT_CLIENT_SECRET}" in banner
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer cli-token"}, timeout=5) as c:
            assert put(c, "a1").status_code == 204
            assert c.get("/_sandbox/applied").json()["applied"] == {"a1": 1}
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=10)

    assert process.returncode == 0
    assert "1 requests, 1 applied" in out
    assert err == ""
