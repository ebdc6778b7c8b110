"""HTTP client for the worker protocol (the spec's `workers` tag; see docs/worker-protocol.md).

One core method, `_request`, owns transport: auth header, timeouts, and retries. Each protocol
operation is a short method on top of it. Retries use capped exponential backoff with jitter and
give up after `retry_seconds` in total, so a worker rides out a server restart but not an outage
(and, once the worker shuts down, after its shutdown grace: `stop_retrying_after`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tunery_worker import __version__

log = logging.getLogger("tunery_worker.client")

CHUNK = 1 << 20  # streamed uploads and downloads move 1 MiB at a time


class ProtocolError(Exception):
    """The server answered with an error the worker cannot retry away."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class LeaseLost(ProtocolError):
    """409 `lease_lost`: this attempt no longer owns the job; drop it without reporting anything."""


class _RetryableStatus(Exception):
    """A download answered 429/5xx: retried like a broken connection."""


class Unauthorized(ProtocolError):
    """401/403: the worker token is wrong; no amount of retrying helps."""


def error_from_response(response: httpx.Response) -> ProtocolError:
    """The one place that maps an error response to an exception class."""
    try:
        body = response.json()["error"]
        code, message = str(body.get("code", "unknown")), str(body.get("message", ""))
    except Exception:  # not the API's error shape (a proxy's HTML page, an empty body)
        code, message = "http_error", response.text[:200]
    if response.status_code == 409 and code == "lease_lost":
        return LeaseLost(409, code, message)
    if response.status_code in (401, 403):
        return Unauthorized(response.status_code, code, message)
    return ProtocolError(response.status_code, code, message)


@dataclass(frozen=True)
class RetryPolicy:
    initial_delay: float = 0.5  # seconds before the first retry
    max_delay: float = 30.0  # backoff cap
    retry_seconds: float = 300.0  # give up once this much time has passed since the first try
    min_retry_after: float = 0.1  # floor under a server's Retry-After: "0" must not make a tight loop

    def delay(self, attempt: int) -> float:
        # Full jitter: many workers reconnecting after a restart do not hit the server in lockstep.
        # The exponent is capped because 2**attempt overflows a float after ~1030 attempts (a long
        # download resume loop gets there); by 2**16 max_delay has long been the bound anyway.
        return random.uniform(0, min(self.max_delay, self.initial_delay * 2 ** min(attempt, 16)))


def should_retry(response: httpx.Response | None, error: Exception | None) -> bool:
    # Connection refused/reset, DNS, timeouts: the server is restarting or the network blipped.
    if isinstance(error, httpx.TransportError):
        return True
    if response is None:
        return False
    # Too many requests: the server asked us to back off.
    if response.status_code == 429:
        return True
    # Server-side failures (including a proxy's 502/503/504 while the server restarts).
    return response.status_code >= 500


class WorkerClient:
    def __init__(
        self,
        server_url: str,
        token: str,
        *,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        base = server_url.rstrip("/")
        # download_url values are absolute paths ("/v1/workers/files/…"), so the base is the server root.
        base = base.removesuffix("/v1")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._give_up_at: float | None = None  # set on shutdown: no retry goes past it
        self._http = httpx.Client(
            base_url=base,
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"tunery-worker/{__version__}"},
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
            follow_redirects=True,
        )

    def close(self) -> None:
        self._http.close()

    def stop_retrying_after(self, seconds: float) -> None:
        """From now on, give up retrying once `seconds` have passed (a shutdown must not wait out an
        outage: the jobs' leases expire on the server anyway). An earlier bound stands."""
        give_up_at = time.monotonic() + seconds
        if self._give_up_at is None or give_up_at < self._give_up_at:
            self._give_up_at = give_up_at

    def _out_of_time(self, started: float) -> bool:
        now = time.monotonic()
        return now - started > self.retry.retry_seconds or (
            self._give_up_at is not None and now >= self._give_up_at
        )

    def _backoff(self, delay: float) -> None:
        """Sleep before a retry, never past the shutdown bound."""
        if self._give_up_at is not None:
            delay = min(delay, max(0.0, self._give_up_at - time.monotonic()))
        self._sleep(delay)

    # --- transport --------------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
        body: Callable[[], Generator[bytes, None, None]] | None = None,
        timeout: float | None = None,
        ok: tuple[int, ...] = (200, 201, 204),
    ) -> httpx.Response:
        """Send one request, retrying per `should_retry`; raise the mapped error for any other failure.

        `body` opens a fresh stream per try, so a streamed upload can be retried from the start.
        """
        started = time.monotonic()
        attempt = 0
        while True:
            response, error = None, None
            stream = body() if body is not None else None
            try:
                response = self._http.request(
                    method,
                    path,
                    json=json,
                    params=params,
                    headers=headers,
                    content=stream,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as err:
                error = err
            finally:
                if stream is not None:
                    stream.close()  # a generator's close() closes the file it reads
            if response is not None and response.status_code in ok:
                return response
            if not should_retry(response, error) or self._out_of_time(started):
                if response is None:
                    assert error is not None
                    raise error
                raise error_from_response(response)
            delay = self._retry_after(response)
            if delay is None:
                delay = self.retry.delay(attempt)
            log.warning(
                "%s %s failed (%s); retrying in %.1fs",
                method,
                path,
                error or f"HTTP {response.status_code if response is not None else '?'}",
                delay,
            )
            self._backoff(delay)
            attempt += 1

    def _retry_after(self, response: httpx.Response | None) -> float | None:
        value = response.headers.get("Retry-After") if response is not None else None
        if value is None:
            return None
        try:
            seconds = float(value)
        except ValueError:  # an HTTP date; the computed backoff is good enough
            return None
        # float() also takes "-1", "nan" and "inf", which time.sleep refuses or never returns from:
        # only a finite, non-negative delay is the server's to choose.
        if not math.isfinite(seconds) or seconds < 0:
            return None
        return min(max(seconds, self.retry.min_retry_after), self.retry.max_delay)

    # --- the protocol ---------------------------------------------------------------------------------

    def claim(
        self, worker_id: str, capabilities: dict[str, Any], wait_seconds: float = 20
    ) -> dict[str, Any] | None:
        """Long-poll for a job; None when none arrived within `wait_seconds`."""
        response = self._request(
            "POST",
            "/v1/workers/claim",
            json={"worker_id": worker_id, "capabilities": capabilities, "wait_seconds": wait_seconds},
            # The server holds the request open for wait_seconds; the read timeout must outlast it.
            timeout=wait_seconds + 30,
        )
        if response.status_code == 204:
            return None
        job: dict[str, Any] = response.json()["job"]
        return job

    def claim_or_join(
        self, worker_id: str, capabilities: dict[str, Any], wait_seconds: float, gang: dict[str, Any]
    ) -> tuple[str, dict[str, Any]] | None:
        """A claim of a worker that can join gangs (`gang`: `{addr, port}` of its rendezvous).

        `("job", job)` for a leased job, `("gang", join)` when it joined a forming gang (then wait with
        `gang_wait`), None when nothing arrived within `wait_seconds`.
        """
        response = self._request(
            "POST",
            "/v1/workers/claim",
            json={
                "worker_id": worker_id,
                "capabilities": capabilities,
                "wait_seconds": wait_seconds,
                "gang": gang,
            },
            timeout=wait_seconds + 30,
            ok=(200, 202, 204),
        )
        if response.status_code == 204:
            return None
        answer: dict[str, Any] = response.json()
        # 202: joined a forming gang (the body is the membership); 200: a leased job
        return ("gang", answer) if response.status_code == 202 else ("job", answer["job"])

    def gang_wait(self, job_id: str, member_token: str, wait_seconds: float = 20) -> dict[str, Any]:
        """Long-poll of a gang member: `{state: forming|started|expired, ...}`; LeaseLost when it is gone."""
        answer: dict[str, Any] = self._request(
            "POST",
            f"/v1/workers/jobs/{job_id}/gang/wait",
            json={"member_token": member_token, "wait_seconds": wait_seconds},
            timeout=wait_seconds + 30,
        ).json()
        return answer

    def gang_heartbeat(self, job_id: str, member_token: str) -> dict[str, Any]:
        """A gang member's heartbeat (ranks above 0); LeaseLost once the gang's attempt ended."""
        answer: dict[str, Any] = self._request(
            "POST", f"/v1/workers/jobs/{job_id}/gang/heartbeat", json={"member_token": member_token}
        ).json()
        return answer

    def claim_inference(
        self, worker_id: str, wait_seconds: float = 20, backend: str | None = None
    ) -> dict[str, Any] | None:
        """Long-poll for an inference request (a serving worker); None when none arrived in time.

        `backend` (`transformers`, `vllm`) is shown to operators in the server's status.
        """
        body: dict[str, Any] = {"worker_id": worker_id, "wait_seconds": wait_seconds}
        if backend is not None:
            body["backend"] = backend
        response = self._request(
            "POST",
            "/v1/workers/inference/claim",
            json=body,
            timeout=wait_seconds + 30,
        )
        if response.status_code == 204:
            return None
        request: dict[str, Any] = response.json()
        return request

    def report_inference(self, request_id: str, report: dict[str, Any]) -> bool:
        """Relays text to the caller; True when the caller is gone (stop generating)."""
        answer = self._request("POST", f"/v1/workers/inference/{request_id}/report", json=report).json()
        return bool(answer["cancelled"])

    def heartbeat(
        self, job_id: str, lease_token: str, progress: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"lease_token": lease_token}
        if progress:
            payload["progress"] = progress
        answer: dict[str, Any] = self._request(
            "POST", f"/v1/workers/jobs/{job_id}/heartbeat", json=payload
        ).json()
        return answer

    # Report answers say `{accepted, cancel_requested}`: the runner stops on a cancel without
    # waiting for the next heartbeat.
    def report_logs(self, job_id: str, lease_token: str, lines: list[dict[str, Any]]) -> dict[str, Any]:
        payload = {"lease_token": lease_token, "lines": lines}
        answer: dict[str, Any] = self._request("POST", f"/v1/workers/jobs/{job_id}/logs", json=payload).json()
        return answer

    def report_metrics(self, job_id: str, lease_token: str, points: list[dict[str, Any]]) -> dict[str, Any]:
        payload = {"lease_token": lease_token, "points": points}
        answer: dict[str, Any] = self._request(
            "POST", f"/v1/workers/jobs/{job_id}/metrics", json=payload
        ).json()
        return answer

    def report_events(
        self,
        job_id: str,
        lease_token: str,
        events: list[dict[str, Any]],
        phase: str | None = None,
        progress: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"lease_token": lease_token, "events": events}
        if phase is not None:
            payload["phase"] = phase
        if progress:
            payload["progress"] = progress
        answer: dict[str, Any] = self._request(
            "POST", f"/v1/workers/jobs/{job_id}/events", json=payload
        ).json()
        return answer

    def upload_checkpoint(
        self, job_id: str, lease_token: str, name: str, step: int, path: Path
    ) -> dict[str, Any]:
        return self._upload(
            f"/v1/workers/jobs/{job_id}/checkpoints/{name}", lease_token, path, {"step": step}
        )

    def upload_output(self, job_id: str, lease_token: str, name: str, path: Path) -> dict[str, Any]:
        return self._upload(f"/v1/workers/jobs/{job_id}/outputs/{name}", lease_token, path)

    def _upload(
        self, url: str, lease_token: str, path: Path, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Stream `path` to `url`, resuming after a broken connection instead of starting over.

        Each try sends `Content-Range: bytes <offset>-<last>/<size>` and the file from `offset`.
        After a dropped connection or a 5xx the worker asks the server how much it holds
        (`GET <url>/offset`) and continues from there, so a drop late in a 20 GB transfer costs
        only what was in flight. Gives up once no byte has been accepted for `retry_seconds`.
        """
        size = path.stat().st_size
        digest = _UploadDigest(path)
        offset, attempt, progress_at = 0, 0, time.monotonic()
        while True:
            response, error = None, None
            headers = {
                "X-Lease-Token": lease_token,
                "Content-Type": "application/octet-stream",
                "Content-Length": str(size - offset),
            }
            if size:  # an empty file has no byte range to name
                headers["Content-Range"] = f"bytes {offset}-{size - 1}/{size}"
            stream = digest.stream_from(offset)
            try:
                response = self._http.request("PUT", url, params=params, headers=headers, content=stream)
            except httpx.TransportError as err:
                error = err
            finally:
                stream.close()
            if response is not None and response.status_code == 201:
                stored: dict[str, Any] = response.json()
                if stored.get("sha256") != digest.hexdigest():
                    raise ProtocolError(201, "upload_corrupt", f"{url}: the server stored other bytes")
                return stored
            # The server holds other bytes than this try assumed (or saw this body end early, behind a
            # proxy that answered for a dead connection): ask it where to go on, as after a drop.
            mismatch = response is not None and (response.status_code, _code(response)) in (
                (409, "upload_offset_mismatch"),
                (400, "upload_interrupted"),
            )
            # no byte accepted for retry_seconds, or the shutdown bound has passed
            gave_up = self._out_of_time(progress_at)
            if not (mismatch or should_retry(response, error)) or gave_up:
                if response is None:
                    assert error is not None
                    raise error
                raise error_from_response(response)
            delay = 0.0 if mismatch else self._retry_after(response)
            delay = self.retry.delay(attempt) if delay is None else delay
            log.warning(
                "upload %s broke at byte %d (%s); resuming in %.1fs",
                url,
                offset,
                error or f"HTTP {response.status_code if response is not None else '?'}",
                delay,
            )
            self._backoff(delay)
            attempt += 1
            held = self._upload_offset(url, lease_token)
            whole = held.get("stored")
            if whole and whole.get("size_bytes") == size and whole.get("sha256") == digest.hexdigest():
                return dict(whole)  # this attempt's file arrived whole; only its 201 was lost
            # other bytes stored under the name: start over (the part holds none)
            received = 0 if whole else int(held["received_bytes"])
            if received > offset:  # progress: the backoff and the give-up clock start again
                attempt, progress_at = 0, time.monotonic()
            offset = received if received < size else 0

    def _upload_offset(self, url: str, lease_token: str) -> dict[str, Any]:
        """What the server holds of the upload at `url`: `received_bytes`, and `stored` when whole."""
        answer: dict[str, Any] = self._request(
            "GET", f"{url}/offset", headers={"X-Lease-Token": lease_token}
        ).json()
        return answer

    def download(
        self,
        url: str,
        dest: Path,
        sha256: str | None = None,
        size_bytes: int | None = None,
        *,
        lease_token: str | None = None,
    ) -> Path:
        """Stream `url` to `dest`, resuming with Range after a broken connection; verify the checksum.

        Job files open only with the lease of the job that reads them (`X-Lease-Token`).
        """
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".part")
        partial.unlink(missing_ok=True)
        started, attempt = time.monotonic(), 0
        while True:
            try:
                self._download_once(url, partial, lease_token)
                break
            except (httpx.TransportError, _RetryableStatus) as err:
                if self._out_of_time(started):
                    raise
                delay = self.retry.delay(attempt)
                log.warning("download of %s broke (%s); resuming in %.1fs", url, err, delay)
                self._backoff(delay)
                attempt += 1
        if size_bytes is not None and partial.stat().st_size != size_bytes:
            raise ProtocolError(
                200, "download_corrupt", f"{url}: got {partial.stat().st_size} of {size_bytes} bytes"
            )
        if sha256 and _sha256(partial) != sha256.lower():
            raise ProtocolError(200, "download_corrupt", f"{url}: sha256 mismatch")
        partial.replace(dest)
        return dest

    def _download_once(self, url: str, partial: Path, lease_token: str | None) -> None:
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if lease_token:
            headers["X-Lease-Token"] = lease_token
        with self._http.stream("GET", url, headers=headers) as response:
            if response.status_code == 416:  # we already hold every byte
                return
            if response.status_code not in (200, 206):
                response.read()
                if should_retry(response, None):
                    raise _RetryableStatus(response.status_code)
                raise error_from_response(response)
            # A 200 answer to a Range request is the whole file again: start over.
            with open(partial, "ab" if response.status_code == 206 else "wb") as out:
                # Written as it arrives (no re-chunking buffer), so a broken connection loses nothing.
                for chunk in response.iter_bytes():
                    out.write(chunk)

    def complete(self, job_id: str, lease_token: str, result: dict[str, Any]) -> dict[str, Any]:
        return self._transition(job_id, "complete", {"lease_token": lease_token, "result": result})

    def fail(self, job_id: str, lease_token: str, code: str, message: str, retryable: bool) -> dict[str, Any]:
        payload = {"lease_token": lease_token, "error": {"code": code, "message": message[:10000]}}
        return self._transition(job_id, "fail", {**payload, "retryable": retryable})

    def cancelled(self, job_id: str, lease_token: str) -> dict[str, Any]:
        return self._transition(job_id, "cancelled", {"lease_token": lease_token})

    def release(self, job_id: str, lease_token: str) -> dict[str, Any]:
        """Hand the job back on shutdown: pending again at once, and the attempt does not count."""
        return self._transition(job_id, "release", {"lease_token": lease_token})

    def _transition(self, job_id: str, action: str, payload: dict[str, Any]) -> dict[str, Any]:
        answer: dict[str, Any] = self._request(
            "POST", f"/v1/workers/jobs/{job_id}/{action}", json=payload
        ).json()
        return answer


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_file(path: Path, offset: int = 0) -> Generator[bytes, None, None]:
    with open(path, "rb") as handle:
        handle.seek(offset)
        yield from iter(lambda: handle.read(CHUNK), b"")


def _code(response: httpx.Response) -> str | None:
    """The `error.code` of an API error answer, if it is one."""
    try:
        return str(response.json()["error"]["code"])
    except Exception:
        return None


class _UploadDigest:
    """SHA-256 of a file computed while it is uploaded, checked against what the server stored.

    A resumed try streams from an offset: the bytes before it are hashed from disk first, unless
    the previous try already hashed exactly that far.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._hash = hashlib.sha256()
        self._hashed = 0

    def stream_from(self, offset: int) -> Generator[bytes, None, None]:
        if self._hashed != offset:
            self._hash, self._hashed = hashlib.sha256(), 0
            with open(self.path, "rb") as handle:
                while self._hashed < offset:
                    chunk = handle.read(min(CHUNK, offset - self._hashed))
                    self._hash.update(chunk)
                    self._hashed += len(chunk)
        return self._stream(offset)

    def _stream(self, offset: int) -> Generator[bytes, None, None]:
        # A generator, not the file: httpx iterates file objects by line, not by chunk.
        for chunk in iter_file(self.path, offset):
            self._hash.update(chunk)
            self._hashed += len(chunk)
            yield chunk

    def hexdigest(self) -> str:
        if self._hashed != self.path.stat().st_size:  # the last try did not read to the end
            self.stream_from(self.path.stat().st_size)
        return self._hash.hexdigest()
