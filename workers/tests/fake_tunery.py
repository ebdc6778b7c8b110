"""An in-memory Tunery server speaking the worker protocol, on 127.0.0.1 in a thread, for tests.

It keeps what workers send (logs, metrics, events, files, transitions), fences every write by lease
token (409 lease_lost), and can inject faults: answer a route with an error status, drop the
connection, or cut a download short.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

TOKEN = "test-worker-token"


@dataclass
class FakeState:
    queue: list[dict[str, Any]] = field(default_factory=list)
    leases: dict[str, str] = field(default_factory=dict)  # job_id → the live lease token
    cancel: set[str] = field(default_factory=set)
    files: dict[str, bytes] = field(default_factory=dict)  # file_id → content
    file_jobs: dict[str, str] = field(default_factory=dict)  # file_id → the job that reads it
    claims: list[dict[str, Any]] = field(default_factory=list)
    heartbeats: list[dict[str, Any]] = field(default_factory=list)
    logs: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))
    metrics: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    events: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    phases: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    progress: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[str, dict[str, tuple[int, bytes]]] = field(default_factory=lambda: defaultdict(dict))
    outputs: dict[str, dict[str, bytes]] = field(default_factory=lambda: defaultdict(dict))
    upload_headers: list[dict[str, str]] = field(default_factory=list)
    # (job_id, "checkpoints" | "outputs", name) → the bytes received of an unfinished upload
    parts: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    upload_ranges: list[str | None] = field(default_factory=list)  # each upload request's Content-Range
    # (job_id, kind, name) → the last whole file received (GET …/offset answers it as `stored`)
    stored_uploads: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    completed: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancelled: set[str] = field(default_factory=set)
    released: set[str] = field(default_factory=set)  # handed back on shutdown (pending again)
    requests: list[tuple[str, str]] = field(default_factory=list)
    # route name → faults to apply to its next requests: an int status, a (status, code) error,
    # "drop", "truncate" (downloads), "cut" (uploads: half the body arrives, then a drop) or
    # "lose-answer" (uploads: the file is stored, then a drop instead of the 201).
    faults: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    range_requests: list[str] = field(default_factory=list)


class FakeTunery:
    def __init__(self, port: int = 0) -> None:
        self.state = FakeState()
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = port
        self.down = False

    # --- control ------------------------------------------------------------------------------------

    def start(self) -> FakeTunery:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def go_down(self) -> None:
        """The server process dies: new connections are refused, and kept-alive ones are dropped at
        their next request instead of being answered."""
        self.down = True
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_file(self, content: bytes, job_id: str | None = None) -> dict[str, Any]:
        """A file to download; one a job reads opens only with that job's live lease, like the server."""
        file_id = f"file_{uuid.uuid4().hex[:10]}"
        self.state.files[file_id] = content
        if job_id is not None:
            self.state.file_jobs[file_id] = job_id
        return {
            "file_id": file_id,
            "download_url": f"/v1/workers/files/{file_id}",
            "size_bytes": len(content),
            "sha256": hashlib.sha256(content).hexdigest(),
        }

    def enqueue(
        self,
        job_type: str,
        spec: dict[str, Any],
        inputs: list[tuple[str, str, bytes]] = (),  # type: ignore[assignment]
        resume: tuple[str, int, bytes] | None = None,
        lease_seconds: int = 60,
        log_seq: int = 0,
        attempt: int = 1,
    ) -> str:
        job_id = f"job_{uuid.uuid4().hex[:10]}"
        job = {
            "job_id": job_id,
            "kind": "training",
            "type": job_type,
            "attempt": attempt,
            "lease_token": "",
            "lease_expires_at": "2030-01-01T00:00:00Z",
            "lease_seconds": lease_seconds,
            "log_seq": log_seq,
            "spec": spec,
            "inputs": [
                {"role": role, "name": name, **self.add_file(data, job_id)} for role, name, data in inputs
            ],
            "resume_from": None,
        }
        if resume is not None:
            name, step, data = resume
            job["resume_from"] = {
                "name": name,
                "step": step,
                "download_url": self.add_file(data, job_id)["download_url"],
            }
        with self.lock:
            self.state.queue.append(job)
        return job_id

    def lose_lease(self, job_id: str) -> None:
        with self.lock:
            self.state.leases[job_id] = "stolen-" + uuid.uuid4().hex

    def fault(self, route: str, *faults: Any) -> None:
        with self.lock:
            self.state.faults[route].extend(faults)

    def take_fault(self, route: str) -> Any:
        with self.lock:
            pending = self.state.faults.get(route)
            return pending.pop(0) if pending else None

    def log_lines(self, job_id: str) -> list[dict[str, Any]]:
        return [self.state.logs[job_id][seq] for seq in sorted(self.state.logs[job_id])]


ROUTES = [
    ("POST", re.compile(r"^/v1/workers/claim$"), "claim"),
    ("POST", re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/heartbeat$"), "heartbeat"),
    ("POST", re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/logs$"), "logs"),
    ("POST", re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/metrics$"), "metrics"),
    ("POST", re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/events$"), "events"),
    ("PUT", re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/checkpoints/(?P<name>[^/]+)$"), "checkpoint"),
    ("PUT", re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/outputs/(?P<name>[^/]+)$"), "output"),
    ("GET", re.compile(r"^/v1/workers/files/(?P<file>[^/]+)$"), "file"),
    (
        "GET",
        re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/(?P<kind>checkpoints|outputs)/(?P<name>[^/]+)/offset$"),
        "offset",
    ),
    (
        "POST",
        re.compile(r"^/v1/workers/jobs/(?P<job>[^/]+)/(?P<action>complete|fail|cancelled|release)$"),
        "transition",
    ),
]


class _Handler(BaseHTTPRequestHandler):
    fake: FakeTunery
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --- plumbing -------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        if self.fake.down:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        url = urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        state = self.fake.state
        with self.fake.lock:
            state.requests.append((method, url.path))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._error(401, "unauthorized")
        for route_method, pattern, name in ROUTES:
            match = pattern.match(url.path)
            if route_method == method and match:
                fault = self.fake.take_fault(name)
                if fault == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return None
                if isinstance(fault, int):
                    return self._error(fault, "injected", {"Retry-After": "0"} if fault == 429 else None)
                if isinstance(fault, tuple):  # (status, error code)
                    return self._error(*fault)
                params = {k: v[0] for k, v in parse_qs(url.query).items()}
                return getattr(self, f"_{name}")(match.groupdict(), body, params, fault)
        return self._error(404, "not_found")

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": {"code": code, "message": f"{code} ({status})", "param": None}}, headers)

    def _leased(self, job_id: str, token: str | None) -> bool:
        if self.fake.state.leases.get(job_id) != token:
            self._error(409, "lease_lost")
            return False
        return True

    # --- routes ------------------------------------------------------------------------------------------

    def _claim(self, _: dict[str, str], body: bytes, __: dict[str, str], ___: Any) -> None:
        request = json.loads(body)
        state = self.fake.state
        deadline = time.monotonic() + float(request.get("wait_seconds", 20))
        while True:
            with self.fake.lock:
                state.claims.append(request)
                types = request["capabilities"]["job_types"]
                job = next((j for j in state.queue if j["type"] in types), None)
                if job is not None:
                    state.queue.remove(job)
                    job["lease_token"] = f"lease-{uuid.uuid4().hex}"
                    state.leases[job["job_id"]] = job["lease_token"]
                    return self._json(200, {"job": job})
            if time.monotonic() >= deadline:
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return None
            time.sleep(0.02)

    def _heartbeat(self, ids: dict[str, str], body: bytes, _: dict[str, str], __: Any) -> None:
        request = json.loads(body)
        if not self._leased(ids["job"], request["lease_token"]):
            return
        with self.fake.lock:
            self.fake.state.heartbeats.append({"job_id": ids["job"], **request})
        cancel = ids["job"] in self.fake.state.cancel
        self._json(200, {"lease_expires_at": "2030-01-01T00:00:00Z", "cancel_requested": cancel})

    def _logs(self, ids: dict[str, str], body: bytes, _: dict[str, str], __: Any) -> None:
        request = json.loads(body)
        if not self._leased(ids["job"], request["lease_token"]):
            return
        with self.fake.lock:
            stored = self.fake.state.logs[ids["job"]]
            new = [line for line in request["lines"] if line["seq"] not in stored]
            stored.update({line["seq"]: line for line in new})
        self._json(200, {"accepted": len(new), "cancel_requested": ids["job"] in self.fake.state.cancel})

    def _metrics(self, ids: dict[str, str], body: bytes, _: dict[str, str], __: Any) -> None:
        request = json.loads(body)
        if not self._leased(ids["job"], request["lease_token"]):
            return
        with self.fake.lock:
            self.fake.state.metrics[ids["job"]].extend(request["points"])
        self._json(
            200,
            {"accepted": len(request["points"]), "cancel_requested": ids["job"] in self.fake.state.cancel},
        )

    def _events(self, ids: dict[str, str], body: bytes, _: dict[str, str], __: Any) -> None:
        request = json.loads(body)
        if not self._leased(ids["job"], request["lease_token"]):
            return
        state = self.fake.state
        with self.fake.lock:
            state.events[ids["job"]].extend(request.get("events", []))
            if "phase" in request:
                state.phases[ids["job"]].append(request["phase"])
            if "progress" in request:
                state.progress[ids["job"]] = request["progress"]
        self._json(
            200, {"accepted": len(request.get("events", [])), "cancel_requested": ids["job"] in state.cancel}
        )

    def _checkpoint(self, ids: dict[str, str], body: bytes, params: dict[str, str], fault: Any) -> None:
        if not self._leased(ids["job"], self.headers.get("X-Lease-Token")):
            return
        data = self._receive(ids["job"], "checkpoints", ids["name"], body, fault)
        if data is None:
            return
        with self.fake.lock:
            self.fake.state.checkpoints[ids["job"]][ids["name"]] = (int(params["step"]), data)
        self._stored(ids["name"], data, fault)

    def _output(self, ids: dict[str, str], body: bytes, _: dict[str, str], fault: Any) -> None:
        if not self._leased(ids["job"], self.headers.get("X-Lease-Token")):
            return
        data = self._receive(ids["job"], "outputs", ids["name"], body, fault)
        if data is None:
            return
        with self.fake.lock:
            self.fake.state.outputs[ids["job"]][ids["name"]] = data
        self._stored(ids["name"], data, fault)

    def _receive(self, job: str, kind: str, name: str, body: bytes, fault: Any) -> bytes | None:
        """The server's resumable upload: the whole file once it is complete, else None (answered)."""
        state, key = self.fake.state, (job, kind, name)
        content_range = self.headers.get("Content-Range")
        with self.fake.lock:
            state.upload_headers.append(dict(self.headers))
            state.upload_ranges.append(content_range)
        first, total = 0, len(body)
        if content_range:
            match = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", content_range)
            assert match, content_range
            first, total = int(match[1]), int(match[3])
        have = state.parts.get(key, b"") if first else b""
        if first != len(have):
            self._error(409, "upload_offset_mismatch")
            return None
        if fault == "cut":  # half the body arrives, then the connection dies
            state.parts[key] = have + body[: len(body) // 2]
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        data = have + body
        if len(data) < total:
            state.parts[key] = data
            self._json(202, {"received_bytes": len(data)})
            return None
        state.parts.pop(key, None)
        state.stored_uploads[key] = data
        return data

    def _offset(self, ids: dict[str, str], _: bytes, __: dict[str, str], ___: Any) -> None:
        if not self._leased(ids["job"], self.headers.get("X-Lease-Token")):
            return
        key = (ids["job"], ids["kind"], ids["name"])
        received = len(self.fake.state.parts.get(key, b""))
        stored = self.fake.state.stored_uploads.get(key)
        if not received and stored is not None:  # the whole file arrived (this fake has one attempt)
            digest = hashlib.sha256(stored).hexdigest()
            answer = {"name": ids["name"], "size_bytes": len(stored), "sha256": digest}
            return self._json(200, {"received_bytes": 0, "stored": answer})
        self._json(200, {"received_bytes": received})

    def _stored(self, name: str, body: bytes, fault: Any = None) -> None:
        if fault == "lose-answer":  # the file is stored, then the connection dies before the 201
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self._json(201, {"name": name, "size_bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})

    def _file(self, ids: dict[str, str], _: bytes, __: dict[str, str], fault: Any) -> None:
        data = self.fake.state.files.get(ids["file"])
        reader = self.fake.state.file_jobs.get(ids["file"])
        if reader is not None and self.fake.state.leases.get(reader) != self.headers.get("X-Lease-Token"):
            data = None  # another job's file, or no live lease: as if it did not exist
        if data is None:
            return self._error(404, "not_found")
        start, status = 0, 200
        requested = self.headers.get("Range")
        if requested:
            self.fake.state.range_requests.append(requested)
            start, status = int(requested.removeprefix("bytes=").rstrip("-")), 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault == "truncate":  # half the body, then the connection dies
            self.wfile.write(data[start : start + (len(data) - start) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return None
        self.wfile.write(data[start:])
        return None

    def _transition(self, ids: dict[str, str], body: bytes, _: dict[str, str], __: Any) -> None:
        request = json.loads(body)
        if not self._leased(ids["job"], request["lease_token"]):
            return
        state, job_id = self.fake.state, ids["job"]
        with self.fake.lock:
            state.leases.pop(job_id, None)  # the attempt is over: any later write is stale
            if ids["action"] == "complete":
                state.completed[job_id] = request["result"]
                status = "completed"
            elif ids["action"] == "fail":
                state.failed[job_id] = {
                    "error": request["error"],
                    "retryable": request.get("retryable", True),
                }
                status = "failed"
            elif ids["action"] == "release":
                state.released.add(job_id)
                status = "pending"
            else:
                state.cancelled.add(job_id)
                status = "cancelled"
        self._json(200, {"job_id": job_id, "status": status})
