"""The protocol client against a local fake server: retries, fencing, streamed uploads, resumed downloads."""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_tunery import TOKEN, FakeTunery

from tunery_worker.client import LeaseLost, ProtocolError, RetryPolicy, Unauthorized, WorkerClient

CAPS = {"job_types": ["finetune"], "methods": ["lora"], "device": "cpu", "memory_gb": 1.0}


@pytest.fixture
def server() -> Iterator[FakeTunery]:
    fake = FakeTunery().start()
    yield fake
    fake.stop()


class Sleeps(list[float]):
    """Records backoff delays instead of sleeping them."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def make_client(url: str, sleeps: Sleeps, token: str = TOKEN, retry_seconds: float = 60) -> WorkerClient:
    return WorkerClient(url, token, retry=RetryPolicy(retry_seconds=retry_seconds), sleep=sleeps, timeout=5)


def claimed(server: FakeTunery, client: WorkerClient) -> dict:  # type: ignore[type-arg]
    server.enqueue("finetune", {"method": "lora"})
    job = client.claim("w1", CAPS, wait_seconds=0)
    assert job is not None
    return job


def test_claim_returns_none_after_the_long_poll(server: FakeTunery) -> None:
    client = make_client(server.url, Sleeps())
    assert client.claim("w1", CAPS, wait_seconds=0.2) is None
    job = claimed(server, client)
    assert job["type"] == "finetune" and job["lease_token"].startswith("lease-")
    assert server.state.claims[-1] == {"worker_id": "w1", "capabilities": CAPS, "wait_seconds": 0}


def test_5xx_429_and_dropped_connections_are_retried_with_capped_backoff(server: FakeTunery) -> None:
    sleeps = Sleeps()
    client = make_client(server.url, sleeps)
    job = claimed(server, client)
    server.fault("heartbeat", 503, "drop", 429, 500, 502)
    answer = client.heartbeat(job["job_id"], job["lease_token"], {"current_step": 3})
    assert answer["cancel_requested"] is False
    assert len(sleeps) == 5
    assert sleeps[2] == RetryPolicy().min_retry_after  # 429's Retry-After: 0, floored against a tight loop
    assert all(0 <= s <= RetryPolicy().max_delay for s in sleeps)
    assert server.state.heartbeats[-1]["progress"] == {"current_step": 3}


def test_backoff_grows_exponentially_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_delay=1, max_delay=8)
    highs = [max(policy.delay(attempt) for _ in range(200)) for attempt in range(6)]
    assert highs[0] <= 1 and highs[2] <= 4 and all(h <= 8 for h in highs)
    assert highs[5] > 4  # reaches the cap's range, never beyond


def test_backoff_survives_thousands_of_attempts() -> None:
    policy = RetryPolicy()  # 0.5 * 2**1100 would not fit a float
    assert all(0 <= policy.delay(attempt) <= policy.max_delay for attempt in (1030, 1100, 10**6))


@pytest.mark.parametrize(
    ("header", "slept"),
    [
        ("2", 2.0),
        ("0", RetryPolicy().min_retry_after),
        ("1000", RetryPolicy().max_delay),
        # Not a delay the server may choose: the computed backoff (attempt 0: at most initial_delay).
        ("-1", None),
        ("nan", None),
        ("inf", None),
        ("Wed, 21 Oct 2015 07:28:00 GMT", None),
    ],
)
def test_retry_after_is_honoured_only_when_it_is_a_sane_delay(header: str, slept: float | None) -> None:
    answers = [
        httpx.Response(429, headers={"Retry-After": header}),
        httpx.Response(200, json={"accepted": True, "cancel_requested": False}),
    ]
    sleeps = Sleeps()
    client = WorkerClient(
        "http://tunery.test", TOKEN, transport=httpx.MockTransport(lambda _: answers.pop(0)), sleep=sleeps
    )
    client.heartbeat("job_1", "lease-1")
    [delay] = sleeps
    if slept is None:
        assert 0 <= delay <= RetryPolicy().initial_delay
    else:
        assert delay == slept


def test_survives_a_server_restart(tmp_path: Path) -> None:
    # Reserve a port, leave it closed (the server is "down"), and bring the server up during the backoff.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = FakeTunery(port=port)
    sleeps = Sleeps()

    def sleep_then_start(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:
            fake.start()

    client = WorkerClient(
        fake.url, TOKEN, retry=RetryPolicy(retry_seconds=60), sleep=sleep_then_start, timeout=5
    )
    try:
        assert client.claim("w1", CAPS, wait_seconds=0) is None
        assert len(sleeps) == 3
    finally:
        fake.stop()


def test_gives_up_after_the_retry_budget(server: FakeTunery) -> None:
    client = make_client(server.url, Sleeps(), retry_seconds=0)
    server.fault("claim", 503)
    with pytest.raises(ProtocolError) as caught:
        client.claim("w1", CAPS, wait_seconds=0)
    assert caught.value.status == 503


def test_lease_lost_is_raised_at_once_without_retries(server: FakeTunery) -> None:
    sleeps = Sleeps()
    client = make_client(server.url, sleeps)
    job = claimed(server, client)
    server.lose_lease(job["job_id"])
    with pytest.raises(LeaseLost):
        client.report_logs(job["job_id"], job["lease_token"], [{"seq": 1, "text": "x"}])
    with pytest.raises(LeaseLost):
        client.complete(job["job_id"], job["lease_token"], {})
    assert sleeps == []


def test_client_errors_are_not_retried(server: FakeTunery) -> None:
    sleeps = Sleeps()
    client = make_client(server.url, sleeps)
    server.fault("claim", 400)
    with pytest.raises(ProtocolError) as caught:
        client.claim("w1", CAPS, wait_seconds=0)
    assert (caught.value.status, caught.value.code) == (400, "injected") and not isinstance(
        caught.value, LeaseLost
    )
    with pytest.raises(Unauthorized):
        make_client(server.url, sleeps, token="wrong").claim("w1", CAPS, wait_seconds=0)
    assert sleeps == []


def test_uploads_stream_the_file_with_the_lease_header_and_retry_whole(
    server: FakeTunery, tmp_path: Path
) -> None:
    client = make_client(server.url, Sleeps())
    job = claimed(server, client)
    payload = os.urandom(3 * (1 << 20) + 123)  # several chunks
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(payload)

    server.fault("checkpoint", 503)
    stored = client.upload_checkpoint(job["job_id"], job["lease_token"], "checkpoint-20", 20, path)
    assert stored == {
        "name": "checkpoint-20",
        "size_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    assert server.state.checkpoints[job["job_id"]]["checkpoint-20"] == (20, payload)
    headers = server.state.upload_headers[-1]
    assert headers["X-Lease-Token"] == job["lease_token"]
    assert headers["Content-Type"] == "application/octet-stream" and headers["Content-Length"] == str(
        len(payload)
    )

    client.upload_output(job["job_id"], job["lease_token"], "adapter_model.safetensors", path)
    assert server.state.outputs[job["job_id"]]["adapter_model.safetensors"] == payload


def test_a_dropped_upload_resumes_from_the_offset_the_server_holds(
    server: FakeTunery, tmp_path: Path
) -> None:
    client = make_client(server.url, Sleeps())
    job = claimed(server, client)
    payload = os.urandom(3 * (1 << 20) + 123)
    size, half = len(payload), len(payload) // 2
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)

    server.fault("output", "cut")  # the server keeps the first half, then the connection dies
    stored = client.upload_output(job["job_id"], job["lease_token"], "model.safetensors", path)
    assert stored["sha256"] == hashlib.sha256(payload).hexdigest()
    assert server.state.outputs[job["job_id"]]["model.safetensors"] == payload
    # the second request asked where to go on, and sent only the rest
    assert server.state.upload_ranges == [f"bytes 0-{size - 1}/{size}", f"bytes {half}-{size - 1}/{size}"]
    assert server.state.upload_headers[-1]["Content-Length"] == str(size - half)
    offset_queries = [p for m, p in server.state.requests if m == "GET" and p.endswith("/offset")]
    assert offset_queries == [f"/v1/workers/jobs/{job['job_id']}/outputs/model.safetensors/offset"]


def test_an_upload_whose_answer_was_lost_is_not_sent_again(server: FakeTunery, tmp_path: Path) -> None:
    client = make_client(server.url, Sleeps())
    job = claimed(server, client)
    payload = os.urandom(1 << 20)
    path = tmp_path / "model.safetensors"
    path.write_bytes(payload)

    server.fault("output", "lose-answer")  # stored whole, then the connection dies before the 201
    stored = client.upload_output(job["job_id"], job["lease_token"], "model.safetensors", path)
    assert stored == {
        "name": "model.safetensors",
        "size_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    # one PUT, then the offset said the file is there with this checksum: no second transfer
    methods = [m for m, p in server.state.requests if "/outputs/model.safetensors" in p]
    assert methods == ["PUT", "GET"]

    # the server holds other bytes under that name (the connection died before any arrived): sent again
    server.state.stored_uploads[(job["job_id"], "outputs", "other.bin")] = b"stale bytes"
    other = tmp_path / "other.bin"
    other.write_bytes(b"new bytes")
    server.fault("output", "drop")
    again = client.upload_output(job["job_id"], job["lease_token"], "other.bin", other)
    assert again["sha256"] == hashlib.sha256(b"new bytes").hexdigest()
    assert [m for m, p in server.state.requests if "/outputs/other.bin" in p] == ["PUT", "GET", "PUT"]

    # the same with stored bytes shorter than the file: the retry still starts at byte 0
    server.state.stored_uploads[(job["job_id"], "outputs", "longer.bin")] = b"old"
    longer = tmp_path / "longer.bin"
    longer.write_bytes(b"a longer file than the stored one")
    server.fault("output", "drop")
    grown = client.upload_output(job["job_id"], job["lease_token"], "longer.bin", longer)
    assert grown["size_bytes"] == longer.stat().st_size
    assert [m for m, p in server.state.requests if "/outputs/longer.bin" in p] == ["PUT", "GET", "PUT"]
    assert server.state.upload_ranges[-1] == f"bytes 0-{longer.stat().st_size - 1}/{longer.stat().st_size}"


def test_an_upload_asks_for_the_offset_on_a_mismatch_but_not_on_other_client_errors(
    server: FakeTunery, tmp_path: Path
) -> None:
    sleeps = Sleeps()
    client = make_client(server.url, sleeps)
    job = claimed(server, client)
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"z" * 5000)
    server.fault("output", (409, "upload_offset_mismatch"), (400, "upload_interrupted"))
    stored = client.upload_output(job["job_id"], job["lease_token"], "adapter.bin", path)
    assert stored["size_bytes"] == 5000
    assert sleeps == [0.0, 0.0]  # no backoff: the server is up, only the offset was off
    methods = [m for m, p in server.state.requests if "/outputs/adapter.bin" in p]
    assert methods == ["PUT", "GET", "PUT", "GET", "PUT"]  # each refusal: where to go on, then resume

    server.fault("output", (400, "invalid_request"))
    with pytest.raises(ProtocolError) as caught:
        client.upload_output(job["job_id"], job["lease_token"], "adapter.bin", path)
    assert caught.value.code == "invalid_request"


def test_an_upload_the_server_stored_differently_is_an_error(server: FakeTunery, tmp_path: Path) -> None:
    client = make_client(server.url, Sleeps())
    job = claimed(server, client)
    path = tmp_path / "adapter.bin"
    path.write_bytes(b"x" * 1000)
    # a stale half from some other file: the resumed upload completes, but not with these bytes
    server.fault("output", "cut")
    server.state.parts[(job["job_id"], "outputs", "adapter.bin")] = b""
    original = client._upload_offset

    def wrong_offset(url: str, lease_token: str) -> dict[str, Any]:
        server.state.parts[(job["job_id"], "outputs", "adapter.bin")] = b"y" * 500
        return original(url, lease_token)

    client._upload_offset = wrong_offset  # type: ignore[method-assign]
    with pytest.raises(ProtocolError, match="upload_corrupt"):
        client.upload_output(job["job_id"], job["lease_token"], "adapter.bin", path)


def test_downloads_resume_with_range_and_verify_the_checksum(server: FakeTunery, tmp_path: Path) -> None:
    client = make_client(server.url, Sleeps())
    payload = os.urandom(1 << 20)
    file = server.add_file(payload)

    server.fault("file", "truncate", 503)
    dest = client.download(
        file["download_url"], tmp_path / "d" / "model.safetensors", file["sha256"], len(payload)
    )
    assert dest.read_bytes() == payload
    assert server.state.range_requests and server.state.range_requests[0] == f"bytes={len(payload) // 2}-"
    assert not (tmp_path / "d" / "model.safetensors.part").exists()

    with pytest.raises(ProtocolError, match="sha256 mismatch"):
        client.download(file["download_url"], tmp_path / "bad", "0" * 64)
    with pytest.raises(ProtocolError) as caught:
        client.download("/v1/workers/files/file_missing", tmp_path / "missing")
    assert caught.value.status == 404


def test_server_url_may_end_with_v1(server: FakeTunery) -> None:
    client = make_client(server.url + "/v1/", Sleeps())
    assert client.claim("w1", CAPS, wait_seconds=0) is None


def test_transport_errors_surface_after_the_budget() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = make_client(f"http://127.0.0.1:{port}", Sleeps(), retry_seconds=0)
    with pytest.raises(httpx.ConnectError):
        client.claim("w1", CAPS, wait_seconds=0)


def test_a_shutdown_bound_stops_retrying_against_a_dead_server(server: FakeTunery, tmp_path: Path) -> None:
    sleeps = Sleeps()
    client = make_client(server.url, sleeps, retry_seconds=300)
    job = claimed(server, client)
    server.go_down()
    client.stop_retrying_after(0)
    with pytest.raises(httpx.TransportError):
        client.release(job["job_id"], job["lease_token"])
    with pytest.raises(httpx.TransportError):
        client.download("/v1/workers/files/file_x", tmp_path / "f")
    upload = tmp_path / "model.safetensors"
    upload.write_bytes(b"weights")
    with pytest.raises(httpx.TransportError):
        client.upload_output(job["job_id"], job["lease_token"], "model.safetensors", upload)
    # One try each, no backoff: the shutdown bound had passed.
    assert sleeps == []
    # A later, longer bound does not lift an earlier one.
    client.stop_retrying_after(600)
    with pytest.raises(httpx.TransportError):
        client.heartbeat(job["job_id"], job["lease_token"])
    assert sleeps == []
