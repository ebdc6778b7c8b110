"""What a tenant can make a worker reach: teacher hosts (egress policy) and model paths (model roots)."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from tunery_worker import egress
from tunery_worker.context import LocalJobContext
from tunery_worker.egress import EgressDenied, EgressPolicy, PinnedTransport, is_public_address
from tunery_worker.errors import InvalidConfig
from tunery_worker.jobs import HANDLERS
from tunery_worker.jobs import distill as distill_module
from tunery_worker.jobs.distill import DistillConfig, OpenAITeacher, TeacherConfig, TeacherError
from tunery_worker.jobs.model_source import checked_source, model_source

SECRET_BODY = "internal-detail-7f3a: db=10.1.2.3 password=hunter2"


class Endpoint:
    """An HTTP server on 127.0.0.1 answering every POST with one status, body and headers."""

    def __init__(self, status: int = 200, body: str = "", headers: dict[str, str] | None = None) -> None:
        self.requests: list[dict[str, str | None]] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                endpoint.requests.append({"path": self.path, "host": self.headers.get("Host")})
                data = body.encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint_factory() -> Iterator:
    made: list[Endpoint] = []

    def make(**kwargs) -> Endpoint:
        made.append(Endpoint(**kwargs))
        return made[-1]

    yield make
    for endpoint in made:
        endpoint.close()


@pytest.fixture
def default_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker as shipped: no allow-list (conftest opts the rest of the suite in to 127.0.0.1)."""
    monkeypatch.delenv(egress.ALLOWED_HOSTS_ENV, raising=False)


def teacher(base_url: str, api_key: str | None = "sk-tenant") -> OpenAITeacher:
    return OpenAITeacher(TeacherConfig(provider="openai", model="m", base_url=base_url, api_key=api_key))


def ask(t: OpenAITeacher) -> dict:
    return t._post({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def fake_dns(monkeypatch: pytest.MonkeyPatch, answers: dict[str, list[list[str]]]) -> list[str]:
    """Stubs name resolution: each lookup of a name takes its next answer. Returns the names looked up."""
    asked: list[str] = []
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in answers:
            return real(host, port, *args, **kwargs)
        asked.append(host)
        addresses = answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]
        family = {4: socket.AF_INET, 6: socket.AF_INET6}
        return [
            (family[ipaddress.ip_address(a).version], socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses
        ]

    monkeypatch.setattr(egress.socket, "getaddrinfo", getaddrinfo)
    return asked


# --- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # CGNAT
        "0.0.0.0",
        "224.0.0.1",
        "239.255.255.250",
        "255.255.255.255",
        "198.18.0.1",
        "192.0.2.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused(address):
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "104.18.6.192", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert is_public_address(ipaddress.ip_address(address))


def test_allow_list_matches_names_and_suffixes():
    raw = " Teacher.Internal , *.corp.example,127.0.0.1,"
    policy = EgressPolicy.from_env({egress.ALLOWED_HOSTS_ENV: raw})
    assert policy.allowed_hosts == ("teacher.internal", "*.corp.example", "127.0.0.1")
    assert policy.lists("teacher.internal") and policy.lists("TEACHER.internal.")
    assert policy.lists("a.corp.example") and policy.lists("a.b.corp.example")
    assert not policy.lists("corp.example") and not policy.lists("evilcorp.example")
    assert not policy.lists("teacher.internal.evil.com")
    assert EgressPolicy.from_env({}).allowed_hosts == ()


# --- the policy where the connection is made --------------------------------------------------------


def test_default_policy_refuses_loopback_teachers_before_sending_anything(default_policy, endpoint_factory):
    endpoint = endpoint_factory(status=200, body="{}")
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(EgressDenied) as err:
            ask(teacher(endpoint.url(host)))
        assert err.value.param == "teacher.base_url" and not err.value.retryable
    assert endpoint.requests == []


def test_a_name_resolving_to_a_private_address_is_refused(default_policy, monkeypatch):
    fake_dns(monkeypatch, {"teacher.example": [["8.8.8.8", "10.0.0.7"]]})
    with pytest.raises(EgressDenied):
        EgressPolicy().resolve("teacher.example", 443)
    fake_dns(monkeypatch, {"teacher.example": [["8.8.4.4"]]})
    assert EgressPolicy().resolve("teacher.example", 443) == "8.8.4.4"


def test_an_allow_list_admits_only_its_hosts(monkeypatch):
    asked = fake_dns(monkeypatch, {"vllm.internal": [["10.0.0.9"]], "api.example": [["8.8.8.8"]]})
    policy = EgressPolicy(("vllm.internal",))
    assert policy.resolve("vllm.internal", 8000) == "10.0.0.9"  # the operator vouches for it
    with pytest.raises(EgressDenied):
        policy.resolve("api.example", 443)
    assert asked == ["vllm.internal"]  # an unlisted name is not even looked up


def test_dns_failures_are_retryable_connection_errors(default_policy):
    with pytest.raises(httpx.ConnectError):
        EgressPolicy().resolve("no-such-host.invalid", 443)


def test_the_connection_goes_to_the_checked_address_not_a_second_dns_answer(monkeypatch):
    # DNS rebinding: a public answer for the check, then loopback for whoever looks again.
    asked = fake_dns(monkeypatch, {"rebind.example": [["8.8.8.8"], ["127.0.0.1"]]})
    seen: list[httpx.Request] = []
    transport = PinnedTransport(
        EgressPolicy(), httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200, json={}))
    )
    with httpx.Client(transport=transport) as client:
        client.post("https://rebind.example/v1/chat/completions", json={})
    assert asked == ["rebind.example"]  # resolved once, by the policy
    (request,) = seen
    assert request.url.host == "8.8.8.8" and request.url.scheme == "https"
    assert request.headers["host"] == "rebind.example"  # the endpoint still sees its name
    assert request.extensions["sni_hostname"] == "rebind.example"  # and TLS verifies that name


def test_a_listed_name_is_reached_at_its_checked_address(monkeypatch, endpoint_factory):
    endpoint = endpoint_factory(status=200, body=json.dumps({"choices": []}))
    fake_dns(monkeypatch, {"teacher.test": [["127.0.0.1"]]})
    monkeypatch.setenv(egress.ALLOWED_HOSTS_ENV, "teacher.test")
    assert ask(teacher(endpoint.url("teacher.test"))) == {"choices": []}
    assert endpoint.requests == [{"path": "/v1/chat/completions", "host": f"teacher.test:{endpoint.port}"}]


def test_a_distill_job_with_a_loopback_teacher_fails_before_calling_it(
    default_policy, endpoint_factory, tmp_path, tiny_llama
):
    endpoint = endpoint_factory(status=200, body="{}")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n")
    teacher_spec = {"provider": "openai", "model": "m", "base_url": endpoint.url(), "api_key": "sk-secret"}
    ctx = LocalJobContext(
        job_id="job_ssrf",
        job_type="distill",
        spec={"base_model": {"name": "s", "source": str(tiny_llama)}, "teacher": teacher_spec},
        workdir=tmp_path,
        inputs={"prompts": prompts},
    )
    with pytest.raises(EgressDenied) as err:
        HANDLERS["distill"](ctx)
    assert endpoint.requests == []
    assert "sk-secret" not in err.value.message


# --- what the teacher client does with answers ------------------------------------------------------


def test_redirects_are_not_followed(monkeypatch, endpoint_factory):
    target = endpoint_factory(status=200, body=json.dumps({"choices": []}))
    redirect = endpoint_factory(status=307, headers={"Location": target.url() + "/chat/completions"})
    with pytest.raises(InvalidConfig) as err:
        ask(teacher(redirect.url()))
    assert target.requests == [] and len(redirect.requests) == 1
    assert err.value.message == "teacher endpoint rejected the request: HTTP 307"


@pytest.mark.parametrize("status", [401, 404, 422])
def test_refusals_say_the_status_and_never_the_body(endpoint_factory, status):
    endpoint = endpoint_factory(status=status, body=SECRET_BODY)
    with pytest.raises(InvalidConfig) as err:
        ask(teacher(endpoint.url()))
    assert str(status) in err.value.message
    assert "internal-detail" not in err.value.message and "hunter2" not in err.value.message


def test_failures_say_the_status_and_never_the_body(monkeypatch, endpoint_factory):
    monkeypatch.setattr(distill_module, "TEACHER_BACKOFF_S", 0.0)
    endpoint = endpoint_factory(status=502, body=SECRET_BODY)
    with pytest.raises(TeacherError) as err:
        ask(teacher(endpoint.url()))
    assert err.value.message.endswith("last: HTTP 502")
    assert "internal-detail" not in err.value.message


def test_connection_failures_are_a_fixed_phrase(monkeypatch, endpoint_factory):
    monkeypatch.setattr(distill_module, "TEACHER_BACKOFF_S", 0.0)
    endpoint = endpoint_factory()
    port = endpoint.port
    endpoint.close()  # nothing listens there now: connection refused
    with pytest.raises(TeacherError) as err:
        ask(teacher(f"http://127.0.0.1:{port}/v1"))
    assert err.value.message.endswith("last: connection failed")
    assert "Errno" not in err.value.message and str(port) not in err.value.message


@pytest.mark.parametrize(
    "url",
    ["http://user:pw@api.example/v1", "https://key@api.example/v1", "file:///etc/passwd", "gopher://x/"],
)
def test_teacher_urls_with_credentials_or_other_schemes_are_refused(url):
    with pytest.raises(InvalidConfig) as err:
        DistillConfig.from_spec({"teacher": {"provider": "openai", "model": "m", "base_url": url}})
    assert err.value.param == "teacher.base_url"


# --- model paths -------------------------------------------------------------------------------------


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A model root holding one model, and a folder outside it holding another."""
    root, outside = tmp_path / "models", tmp_path / "other-tenant"
    for folder in (root / "llama", outside / "secret"):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    monkeypatch.setenv("TUNERY_MODEL_ROOTS", f"relative/ignored:{root}")
    return root, outside


def test_model_paths_load_only_inside_a_model_root(roots):
    root, outside = roots
    assert checked_source("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # hub ids are not paths
    assert checked_source(str(root / "llama")) == os.path.realpath(root / "llama")
    for escape in (str(outside / "secret"), f"{root}/../other-tenant/secret", "/etc", str(root) + "-x"):
        with pytest.raises(InvalidConfig) as err:
            checked_source(escape)
        assert err.value.param == "base_model.source"


def test_a_symlink_inside_a_root_cannot_lead_outside_it(roots):
    root, outside = roots
    (root / "link").symlink_to(outside / "secret")
    with pytest.raises(InvalidConfig):
        checked_source(str(root / "link"))


def test_without_model_roots_no_path_loads(roots, monkeypatch):
    root, _ = roots
    monkeypatch.delenv("TUNERY_MODEL_ROOTS")
    with pytest.raises(InvalidConfig):
        checked_source(str(root / "llama"))


def test_jobs_check_their_spec_source_but_not_their_inputs(roots, tmp_path):
    root, outside = roots

    def ctx(source: str, inputs: dict[str, Path] | None = None) -> LocalJobContext:
        spec = {"base_model": {"name": "m", "source": source}}
        return LocalJobContext(
            job_id="j", job_type="finetune", spec=spec, workdir=tmp_path, inputs=inputs or {}
        )

    with pytest.raises(InvalidConfig):
        model_source(ctx(str(outside / "secret")))
    assert model_source(ctx(str(root / "llama"))) == os.path.realpath(root / "llama")
    # A `model` input is files the server sent for this job's own tenant: loaded where it landed.
    sent = outside / "secret"
    assert model_source(ctx(str(sent), {"model": sent})) == str(sent)
