"""The real client (issue 12): the SAP Cloud SDK for JavaScript, unchanged, against `connector demo`.

`tests/sdk-app` is a small Node.js application written for SAP BTP: it calls destinations by
name with `executeHttpRequest({destinationName, jwt})` of `@sap-cloud-sdk/http-client` (versions
pinned by its package-lock.json, installed with `npm ci` into the repository's ignored `.cache`).
Nothing in it names the connector: it gets the `VCAP_SERVICES` that `connector binding create`
printed, and trusts the demo's CA the way any Node.js process is told to (`NODE_EXTRA_CA_CERTS`).
The demo is started as a user starts it, and the application calls the four destinations the
demo defines: BasicAuthentication, OAuth2ClientCredentials (a token of our token service),
PrincipalPropagation (with a user's token from the password grant, as an application receives
it from its caller) and one through the location id of the demo's second location.

Without `node` or `npm` (or with a Node.js older than the SDK supports) the tests are skipped
with a message saying what to install; under CI (`CI` set), which installs them, they fail.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from connector.demo import DESTINATIONS, LOCATION_2, NODE_2, PRINCIPAL_HOST

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "tests" / "sdk-app"
CACHE = REPO / ".cache" / "sdk-app"
MIN_NODE = 18  # @sap-cloud-sdk 3.x supports Node.js 18 (Debian 12's nodejs) and later
NPM_TIMEOUT = 150.0  # with the demo and the application, within pytest-timeout's 300 s per test
START_TIMEOUT = 60.0
APP_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
MISSING = "no-such-destination"
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


def _unavailable(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{message}: required under CI (install Debian's `nodejs` and `npm` packages)")
    pytest.skip(f"{message} (apt-get install nodejs npm, or scripts/dev test, which installs them)")


def node_tools() -> tuple[str, str]:
    """node and npm, or a skip (a failure under CI) saying what is missing."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _unavailable(f"{' and '.join(name for name, path in (('node', node), ('npm', npm)) if path is None)} "
                     "not installed")
    assert node is not None and npm is not None
    version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    major = int(version.lstrip("v").split(".")[0]) if version.startswith("v") else 0
    if major < MIN_NODE:
        _unavailable(f"node {version or '?'} is older than the SAP Cloud SDK supports (Node.js {MIN_NODE} or later)")
    return node, npm


def install_app(npm: str) -> Path:
    """The application with its pinned packages, installed once per package-lock.json (`npm ci`)."""
    lock = (APP / "package-lock.json").read_bytes()
    target = CACHE / hashlib.sha256(lock + (APP / "package.json").read_bytes()).hexdigest()[:16]
    if not (target / "node_modules" / ".package-lock.json").exists():
        staging = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(APP / name, staging / name)
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=staging,
                                  capture_output=True, text=True, timeout=NPM_TIMEOUT)
        except subprocess.TimeoutExpired:
            _unavailable(f"npm ci did not finish within {NPM_TIMEOUT:g} s (is the npm registry reachable?)")
        if done.returncode != 0:
            _unavailable(f"npm ci failed (is the npm registry reachable?): {done.stderr.strip()[-600:]}")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    shutil.copy(APP / "app.js", target / "app.js")  # the application itself is not part of the cache key
    return target


class Demo:
    """`connector demo` as a user runs it, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, workdir: Path) -> None:
        self.state_file = workdir / "state.json"
        env = {**os.environ, "CONNECTOR_DEMO_POINTER": str(workdir / "pointer.json")}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "connector", "demo", "--dir", str(workdir / "demo"), "--state-file",
             str(self.state_file), "--http-port", "0", "--socks5-port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"connector demo not ready within {START_TIMEOUT:g} s:\n"
                                     + "".join(self.output)) from None
            if line is None:
                raise AssertionError("connector demo ended:\n" + "".join(self.output))
            self.output.append(line)
            if line.startswith("connector demo is running"):
                return dict(json.loads(self.state_file.read_text()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def binding_vcap_services(state: dict[str, Any]) -> str:
    """What `connector binding create` prints for the demo's subaccount: the application's only set-up."""
    done = subprocess.run(
        [sys.executable, "-m", "connector", "binding", "create", "--config", state["cloud"]["config"],
         "--subaccount", state["subaccount"], "--compact"],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def user_token(state: dict[str, Any], vcap: dict[str, Any]) -> str:
    """The demo user's JWT (password grant of the xsuaa binding), as an application receives it from its caller."""
    credentials = vcap["xsuaa"][0]["credentials"]
    form = urllib.parse.urlencode({"grant_type": "password", "username": state["user"]["name"],
                                   "password": state["user"]["password"], "client_id": credentials["clientid"],
                                   "client_secret": credentials["clientsecret"]}).encode()
    context = ssl.create_default_context(cafile=state["token_service"]["ca"])
    with urllib.request.urlopen(f"{credentials['url']}/oauth/token", form, timeout=30, context=context) as answer:
        return str(json.loads(answer.read())["access_token"])


def find_destination(state: dict[str, Any], name: str) -> dict[str, Any]:
    """The destination as the destination service stores it (found with the demo's proxy token)."""
    url = (f"http://127.0.0.1:{state['cloud']['destinations_port']}/destination-configuration/v1/destinations/"
           f"{name}?$skipTokenRetrieval=true")
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {state['token']}"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return dict(json.loads(answer.read())["destinationConfiguration"])


def claims_of(jwt: str) -> dict[str, Any]:
    payload = jwt.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def run_app(node: str, app: Path, vcap_text: str, state: dict[str, Any], calls: list[dict[str, str]],
            ) -> tuple[dict[str, dict[str, Any]], str]:
    """One run of the application (a fresh Node.js process: no token cached): its result per
    destination, and its output."""
    env = {key: value for key, value in os.environ.items() if key not in PROXY_VARIABLES}
    env.update({"VCAP_SERVICES": vcap_text, "NODE_EXTRA_CA_CERTS": state["token_service"]["ca"],
                "NO_PROXY": "*", "no_proxy": "*"})
    done = subprocess.run([node, "app.js", json.dumps(calls)], cwd=app, env=env, capture_output=True, text=True,
                          timeout=APP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    # one JSON object per call; the SDK's own log lines (its warnings) go to stdout too
    results = {r["destination"]: r for r in (json.loads(line) for line in done.stdout.splitlines()
                                              if line.startswith("{"))}
    return results, done.stdout + done.stderr


def token_keys(state: dict[str, Any]) -> list[str]:
    """The kids /token_keys lists (what the SDK and xssec verify tokens with)."""
    context = ssl.create_default_context(cafile=state["token_service"]["ca"])
    with urllib.request.urlopen(f"{state['token_service']['url']}/token_keys", timeout=30, context=context) as answer:
        return [key["kid"] for key in json.loads(answer.read())["keys"]]


def rotate_signing_keys(state: dict[str, Any]) -> list[dict[str, Any]]:
    """`connector cloud-keys rotate` as an operator runs it against the demo's cloud: the ring after."""
    done = subprocess.run(
        [sys.executable, "-m", "connector", "cloud-keys", "rotate", "--config", state["cloud"]["config"]],
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()[1:]]


def kid_of(jwt: str) -> str:
    header = jwt.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One demo, one binding, one run of the application calling each destination once; then the
    token service's signing keys rotated, and the application run again (with a user token
    issued after the rotation, and once more with the one issued before)."""
    node, npm = node_tools()
    app = install_app(npm)
    demo = Demo(tmp_path_factory.mktemp("sdk"))
    try:
        state = demo.wait_ready()
        vcap_text = binding_vcap_services(state)
        user_jwt = user_token(state, json.loads(vcap_text))
        calls = [
            {"destination": DESTINATIONS["BasicAuthentication"], "path": "/sap/opu/odata/basic"},
            {"destination": DESTINATIONS["OAuth2ClientCredentials"], "path": "/sap/opu/odata/oauth"},
            {"destination": DESTINATIONS["PrincipalPropagation"], "path": "/sap/opu/odata/user", "jwt": user_jwt},
            {"destination": DESTINATIONS["CloudConnectorLocationId"], "path": "/sap/opu/odata/plant"},
            {"destination": MISSING, "path": "/sap/opu/odata/none"},
        ]
        results, output = run_app(node, app, vcap_text, state, calls)
        keys_before = token_keys(state)
        ring = rotate_signing_keys(state)
        new_user_jwt = user_token(state, json.loads(vcap_text))
        after, after_output = run_app(node, app, vcap_text, state, [
            *calls[:2], {**calls[2], "jwt": new_user_jwt}, calls[3]])
        old_jwt, old_output = run_app(node, app, vcap_text, state, [calls[2]])
        yield {"state": state, "results": results, "user_jwt": user_jwt, "output": output,
               "keys_before": keys_before, "ring": ring, "keys_after": token_keys(state),
               "new_user_jwt": new_user_jwt, "after_rotation": {"results": after, "output": after_output},
               "old_jwt_after_rotation": {"results": old_jwt, "output": old_output}}
    finally:
        demo.stop()


def answered(run: dict[str, Any], kind: str) -> dict[str, Any]:
    """What the internal host received for the destination of `kind` (it echoes path and headers);
    `run` is the fixture's, or one of its later runs (after_rotation...)."""
    result = run["results"][DESTINATIONS[kind]]
    assert "error" not in result, f"{kind}: {result['error']}\n{run['output']}"
    assert result["status"] == 200
    return dict(result["data"])


def test_basic_authentication_reaches_the_internal_host_with_the_destinations_user(run: dict[str, Any]) -> None:
    data = answered(run, "BasicAuthentication")
    assert (data["path"], data["host"]) == ("/sap/opu/odata/basic", "erp.virtual:8000")
    destination = find_destination(run["state"], DESTINATIONS["BasicAuthentication"])
    expected = base64.b64encode(f"{destination['User']}:{destination['Password']}".encode()).decode()
    assert data["headers"]["authorization"] == f"Basic {expected}"
    assert "proxy-authorization" not in data["headers"]  # the proxy's credential stops at the proxy


def test_oauth2_client_credentials_sends_a_token_of_the_token_service(run: dict[str, Any]) -> None:
    data = answered(run, "OAuth2ClientCredentials")
    assert (data["path"], data["host"]) == ("/sap/opu/odata/oauth", "erp.virtual:8000")
    scheme, _, token = data["headers"]["authorization"].partition(" ")
    assert scheme == "Bearer"
    claims = claims_of(token)
    destination = find_destination(run["state"], DESTINATIONS["OAuth2ClientCredentials"])
    assert claims["iss"] == destination["tokenServiceURL"] == f"{run['state']['token_service']['url']}/oauth/token"
    assert (claims["client_id"], claims["grant_type"]) == (destination["clientId"], "client_credentials")


def test_a_destination_with_a_location_id_is_served_by_that_locations_node(run: dict[str, Any]) -> None:
    data = answered(run, "CloudConnectorLocationId")
    # only the second location maps mes.virtual: reaching it means the location id was sent and used
    assert (data["path"], data["host"]) == ("/sap/opu/odata/plant", "mes.virtual:8000")
    status_url = f"http://127.0.0.1:{run['state']['cloud']['admin_port']}/status"
    with urllib.request.urlopen(status_url, timeout=30) as answer:
        locations = {loc["location_id"]: loc for loc in json.loads(answer.read())["locations"]}
    assert {entry["node"] for entry in locations[LOCATION_2]["routing"]} == {NODE_2}


def test_principal_propagation_is_proxied_and_the_users_token_stays_out(run: dict[str, Any]) -> None:
    data = answered(run, "PrincipalPropagation")
    assert (data["path"], data["host"]) == ("/sap/opu/odata/user", PRINCIPAL_HOST)
    assert "authorization" not in data["headers"]
    # the proxy validated the user's JWT and removed it: the internal host never sees the token
    assert "sap-connectivity-authentication" not in data["headers"]


def test_principal_propagation_the_internal_host_sees_the_users_certificate(run: dict[str, Any]) -> None:
    data = answered(run, "PrincipalPropagation")
    user = claims_of(run["user_jwt"])["user_name"]
    assert data["client_certificate_subject"] == f"CN={user}"


def test_a_destination_that_does_not_exist_is_reported_as_not_found(run: dict[str, Any]) -> None:
    # the SDK tells "not found" (then tries the provider's destinations) from a failed lookup by
    # SAP's ErrorMessage sentence in the 404; any other 404 is "Failed to fetch destination"
    error = run["results"][MISSING]["error"]
    assert f"Failed to resolve the destination 'name: {MISSING}'" in error and "Failed to fetch" not in error


def test_signing_keys_rotate_while_the_application_runs(run: dict[str, Any]) -> None:
    old_kid, new_kid = kid_of(run["user_jwt"]), kid_of(run["new_user_jwt"])
    assert run["keys_before"] == [old_kid]
    # the rotation: a new key signs, the old one is listed (and trusted) for the overlap
    assert [(k["kid"], k["signs"]) for k in run["ring"]] == [(new_kid, True), (old_kid, False)]
    assert run["keys_after"] == [new_kid, old_kid]
    # a fresh process of the application (its tokens fetched anew, signed with the new key) works
    after = run["after_rotation"]
    for kind in ("BasicAuthentication", "OAuth2ClientCredentials", "CloudConnectorLocationId"):
        answered(after, kind)
    user = claims_of(run["new_user_jwt"])["user_name"]
    assert answered(after, "PrincipalPropagation")["client_certificate_subject"] == f"CN={user}"
    oauth = answered(after, "OAuth2ClientCredentials")["headers"]["authorization"].partition(" ")[2]
    assert kid_of(oauth) in (old_kid, new_kid)  # the destination service's cached token, or a new one
    # a user token signed with the old key before the rotation is still accepted during the overlap
    old = run["old_jwt_after_rotation"]
    assert answered(old, "PrincipalPropagation")["client_certificate_subject"] == f"CN={user}"
