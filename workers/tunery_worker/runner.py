"""The worker's main loop: claim a job, run its handler with a RemoteJobContext, report how it ended.

One attempt, in order: claim (long-poll) → download inputs and the resume checkpoint → start the
heartbeat and report-flush threads → run the handler → flush → complete | fail | cancelled. A lease
lost at any point drops the job silently: another attempt owns it now and our writes are refused.
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform
import shutil
import socket
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from tunery_worker.client import LeaseLost, ProtocolError, Unauthorized, WorkerClient
from tunery_worker.context import JobContext, JobStopped
from tunery_worker.errors import Failure, classify
from tunery_worker.jobs import UnknownJobType, available_job_types, load_handler
from tunery_worker.modeling import bitsandbytes_available, total_memory_gb
from tunery_worker.wandb_log import wandb_run

log = logging.getLogger("tunery_worker")

# Roles whose files always form a directory (a model or adapter is several files read together).
DIRECTORY_ROLES = {"adapter", "model"}
# Fields of a metric point in the protocol; anything else a handler adds is not sent.
METRIC_FIELDS = {
    "step", "ts", "phase", "epoch", "cycle", "loss", "eval_loss",
    "lr", "grad_norm", "throughput", "vram_gb", "tokens",
}  # fmt: skip
BATCH_LIMIT = 500  # items per report request (the server takes up to 1000)
MAX_LINE = 10_000  # characters per log line the server accepts


def rfc3339(ts: float | None = None) -> str:
    moment = datetime.fromtimestamp(time.time() if ts is None else ts, tz=timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def json_safe(value: Any) -> Any:
    """NaN and infinities are not JSON: a diverged loss is reported as null instead of breaking the report."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


# --- the context a handler sees when it runs for a server ---------------------------------------------


@dataclass(eq=False)
class RemoteJobContext(JobContext):
    """Buffers reports and sends them in batches (at least every `flush_interval`); heartbeats in a thread.

    `should_stop()` turns true when a heartbeat says the job was cancelled, when the lease is lost, or
    when the worker shuts down; `stop_reason` says which.
    """

    client: WorkerClient | None = None
    lease_token: str = ""
    lease_seconds: float = 60.0
    log_seq: int = 0  # highest log seq the server holds for this job; the next line is log_seq + 1
    flush_interval: float = 1.0
    stop_reason: str | None = None  # "cancelled" | "lease_lost" | "shutdown"

    def __post_init__(self) -> None:
        self._lock = threading.Lock()  # guards the buffers below
        self._flush_lock = threading.Lock()  # one flush at a time keeps batches in order
        self._lines: list[dict[str, Any]] = []
        self._points: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._current_phase: str | None = None
        self._phases: list[str] = []  # phase changes not sent yet, in order (none is skipped)
        self._progress: dict[str, Any] = {}
        self._progress_dirty = False
        self._stop = threading.Event()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- reporting --------------------------------------------------------------------------------

    def log(self, text: str, stream: str = "stdout") -> None:
        (log.warning if stream == "stderr" else log.info)("[%s] %s", self.job_id, text)
        with self._lock:
            for line in text.splitlines() or [""]:
                self.log_seq += 1
                self._lines.append(
                    {"seq": self.log_seq, "ts": rfc3339(), "stream": stream, "text": line[:MAX_LINE]}
                )

    def record_metric(self, point: dict[str, Any]) -> None:
        clean = {k: json_safe(v) for k, v in point.items() if k in METRIC_FIELDS}
        clean["ts"] = rfc3339(point.get("ts") if isinstance(point.get("ts"), int | float) else None)
        clean.setdefault("phase", "train")
        with self._lock:
            self._points.append(clean)

    def event(self, kind: str, payload: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._events.append({"kind": kind, "ts": rfc3339(), "payload": json_safe(payload or {})})

    def set_phase(self, phase: str, progress: dict[str, Any] | None = None) -> None:
        with self._lock:
            if phase != self._current_phase:
                self._current_phase = phase
                self._phases.append(phase)
            # The protocol's progress fields are numbers; "not known yet" is left out, never null.
            self._progress.update({k: v for k, v in json_safe(progress or {}).items() if v is not None})
            self._progress_dirty = True

    def should_stop(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self._stop.set()

    def save_checkpoint(self, name: str, step: int, path: Path) -> None:
        self._check_lease()
        assert self.client is not None
        self.flush_quietly()  # the metrics of the steps a checkpoint covers land before it does
        self.client.upload_checkpoint(self.job_id, self.lease_token, name, step, path)
        self.event("checkpoint", {"name": name, "step": step})

    def upload_output(self, path: Path, name: str | None = None) -> None:
        self._check_lease()
        assert self.client is not None
        self.client.upload_output(self.job_id, self.lease_token, name or path.name, path)

    def _check_lease(self) -> None:
        # After a 409 every write is refused; fail fast instead of uploading gigabytes for nothing.
        if self.stop_reason == "lease_lost":
            raise LeaseLost(409, "lease_lost", f"lease on {self.job_id} was lost")

    # --- sending ----------------------------------------------------------------------------------

    def flush(self) -> None:
        """Send everything buffered. On failure the items go back to the front of the buffers (reports
        are idempotent per seq/step/event, so a resend after a half-done flush is safe)."""
        assert self.client is not None
        with self._flush_lock:
            with self._lock:
                lines, points, events, phases = self._lines, self._points, self._events, self._phases
                progress = dict(self._progress) if self._progress_dirty else None
                self._lines, self._points, self._events, self._phases = [], [], [], []
                self._progress_dirty = False
            try:
                self._send(self.client.report_logs, lines)
                lines = []
                self._send(self.client.report_metrics, points)
                points = []
                # Every phase change reaches the server's timeline, even when several happened between
                # flushes; events and progress ride along with the last one.
                while len(phases) > 1:
                    self._note(self.client.report_events(self.job_id, self.lease_token, [], phases[0]))
                    phases = phases[1:]
                if events or phases or progress:
                    last = phases[0] if phases else None
                    self._note(
                        self.client.report_events(
                            self.job_id, self.lease_token, events[:BATCH_LIMIT], last, progress
                        )
                    )
                    for i in range(BATCH_LIMIT, len(events), BATCH_LIMIT):
                        batch = events[i : i + BATCH_LIMIT]
                        self._note(self.client.report_events(self.job_id, self.lease_token, batch))
                events, phases, progress = [], [], None
            except LeaseLost:
                self.request_stop("lease_lost")
                raise
            except Exception:
                self._requeue(lines, points, events, phases, progress)
                raise

    def _send(self, report: Any, items: list[dict[str, Any]]) -> None:
        for i in range(0, len(items), BATCH_LIMIT):
            self._note(report(self.job_id, self.lease_token, items[i : i + BATCH_LIMIT]))

    def _note(self, answer: Any) -> None:
        """Every report answer carries `cancel_requested`: stop within a flush, not a heartbeat."""
        if isinstance(answer, dict) and answer.get("cancel_requested"):
            self.request_stop("cancelled")

    def _requeue(
        self,
        lines: list[dict[str, Any]],
        points: list[dict[str, Any]],
        events: list[dict[str, Any]],
        phases: list[str],
        progress: dict[str, Any] | None,
    ) -> None:
        with self._lock:
            self._lines = lines + self._lines
            self._points = points + self._points
            self._events = events + self._events
            self._phases = phases + self._phases
            if progress is not None:
                self._progress_dirty = True

    def flush_quietly(self) -> None:
        """Flush at the end of an attempt; a report that cannot be sent must not hide how the job ended."""
        try:
            self.flush()
        except Exception as err:
            log.warning("[%s] could not send the last reports: %s", self.job_id, err)

    # --- background threads ---------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._heartbeat_loop, "heartbeat"), (self._flush_loop, "flush")):
            thread = threading.Thread(target=target, name=f"{name}-{self.job_id}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._closed.set()
        for thread in self._threads:
            thread.join(timeout=5)

    def _heartbeat_loop(self) -> None:
        assert self.client is not None
        interval = max(1.0, self.lease_seconds / 3)
        while not self._closed.wait(interval):
            with self._lock:
                progress = dict(self._progress)
            try:
                answer = self._beat(progress)
            except LeaseLost:
                self.request_stop("lease_lost")
                return
            except Exception as err:  # the client already retried; keep beating while the job runs
                log.warning("[%s] heartbeat failed: %s", self.job_id, err)
                continue
            if answer.get("cancel_requested"):
                self.request_stop("cancelled")

    def _beat(self, progress: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        return self.client.heartbeat(self.job_id, self.lease_token, progress)

    def _flush_loop(self) -> None:
        while not self._closed.wait(self.flush_interval):
            try:
                self.flush()
            except LeaseLost:
                return
            except Exception as err:
                log.warning("[%s] report failed, will resend: %s", self.job_id, err)


@dataclass(eq=False)
class GangMemberContext(RemoteJobContext):
    """A gang member above rank 0: it trains its share and keeps quiet. Rank 0's worker holds the job's
    lease and reports everything; this one only heartbeats its membership (`lease_token` is its member
    token), which answers `lease_lost` once the gang's attempt has ended, however it ended."""

    def log(self, text: str, stream: str = "stdout") -> None:
        (log.warning if stream == "stderr" else log.info)("[%s] %s", self.job_id, text)

    def record_metric(self, point: dict[str, Any]) -> None:
        pass

    def event(self, kind: str, payload: dict[str, Any] | None = None) -> None:
        pass

    def set_phase(self, phase: str, progress: dict[str, Any] | None = None) -> None:
        pass

    def flush(self) -> None:
        pass

    def _beat(self, progress: dict[str, Any]) -> dict[str, Any]:
        assert self.client is not None
        return self.client.gang_heartbeat(self.job_id, self.lease_token)


def free_port(addr: str) -> int:
    """A TCP port free on `addr` now, for the rendezvous this worker would host as a gang's rank 0."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((addr if addr not in ("localhost",) else "127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the worker -----------------------------------------------------------------------------------------


@dataclass
class Worker:
    client: WorkerClient
    device: str = "cpu"
    workdir: Path = Path("./tunery-work")
    worker_id: str = field(default_factory=lambda: f"{platform.node() or 'worker'}-{uuid.uuid4().hex[:8]}")
    concurrency: int = 1
    once: bool = False  # each slot runs at most one job, and stops after one empty long-poll
    wait_seconds: float = 20.0
    keep_workdir: bool = False  # keep each attempt's files (debugging); removed by default
    # After a shutdown request, requests stop retrying after this long: a worker whose server is down
    # still exits (its leases expire on the server, and the jobs go back to the queue anyway).
    shutdown_grace: float = 30.0
    # Set: this worker joins gangs (jobs with num_nodes > 1), hosting their rendezvous on this address
    # when it is rank 0. The other members must reach it there.
    gang_addr: str | None = None

    def __post_init__(self) -> None:
        self._shutdown = threading.Event()
        self._active: dict[str, RemoteJobContext] = {}
        self._active_lock = threading.Lock()
        self.job_types = available_job_types()
        self.fatal: BaseException | None = None

    def capabilities(self) -> dict[str, Any]:
        cuda = self.device.startswith("cuda")
        caps: dict[str, Any] = {
            "job_types": self.job_types,
            "methods": ["lora", "full"] + (["qlora"] if cuda and bitsandbytes_available() else []),
            "device": "cuda" if cuda else "cpu",
            "memory_gb": total_memory_gb(self.device),
        }
        if cuda:
            caps["gpu_name"] = torch.cuda.get_device_name(torch.device(self.device))[:200]
        return caps

    # --- lifecycle ----------------------------------------------------------------------------------

    def run(self) -> int:
        """Run `concurrency` claim loops until shutdown (or, with `once`, until each ran one job)."""
        log.info("worker %s on %s runs %s", self.worker_id, self.device, ", ".join(self.job_types))
        slots = [
            threading.Thread(target=self._slot_loop, name=f"slot-{i}", daemon=True)
            for i in range(self.concurrency)
        ]
        for slot in slots:
            slot.start()
        # join() with a timeout keeps the main thread responsive to signals (SIGTERM, Ctrl-C).
        while any(slot.is_alive() for slot in slots):
            for slot in slots:
                slot.join(timeout=0.5)
        if self.fatal is not None:
            log.error("worker stopped: %s", self.fatal)
            return 2
        return 0

    @property
    def shutdown_requested(self) -> bool:
        return self._shutdown.is_set()

    def request_shutdown(self) -> None:
        """Stop claiming; running jobs stop at their next step, checkpoint, and are handed back.

        Talking to the server is bounded by `shutdown_grace` from here on, so that an unreachable
        server cannot keep the worker from exiting.
        """
        first = not self._shutdown.is_set()
        # Set before anything else: a second signal arriving meanwhile must see the shutdown under way.
        self._shutdown.set()
        if first:
            self.client.stop_retrying_after(self.shutdown_grace)
            log.info(
                "shutting down: running jobs checkpoint and go back to the queue (at most %.0fs more)",
                self.shutdown_grace,
            )
        with self._active_lock:
            for ctx in self._active.values():
                ctx.request_stop("shutdown")

    def _slot_loop(self) -> None:
        caps = self.capabilities()
        failures = job_errors = 0
        while not self._shutdown.is_set():
            try:
                job = self._claim(caps)
                failures = 0
            except Unauthorized as err:
                self.fatal = err
                self._shutdown.set()
                return
            except Exception as err:  # the server stayed down past the client's retries; keep polling
                failures += 1
                log.warning("claim failed: %s", err)
                self._shutdown.wait(min(60.0, 2.0**failures))
                continue
            if job is None:
                if self.once:
                    return
                continue
            try:
                self.run_job(job)
            except Unauthorized as err:
                self.fatal = err
                self._shutdown.set()
                return
            except Exception:
                # run_job turns the job's own failures into a report; what escapes is the server refusing
                # that report (e.g. /complete answering 5xx past the client's retries, or a 404), or the
                # attempt failing to start. The attempt is over either way (the server requeues it once
                # its lease expires), so keep serving: letting this thread die would leave the worker
                # quietly doing nothing. Back off as after a failed claim, so that a worker failing every
                # job does not lease the whole queue away.
                job_errors += 1
                log.exception("[%s] the attempt ended without a report; claiming the next job", job["job_id"])
                self._shutdown.wait(min(60.0, 2.0**job_errors))
            else:
                job_errors = 0
            if self.once:
                return

    def _claim(self, caps: dict[str, Any]) -> dict[str, Any] | None:
        """A job to run: claimed, or (for a worker that joins gangs) a gang that formed around it."""
        if self.gang_addr is None:
            return self.client.claim(self.worker_id, caps, self.wait_seconds)
        address = {"addr": self.gang_addr, "port": free_port(self.gang_addr)}
        answer = self.client.claim_or_join(self.worker_id, caps, self.wait_seconds, address)
        if answer is None:
            return None
        kind, body = answer
        return body if kind == "job" else self._wait_for_gang(body)

    def _wait_for_gang(self, join: dict[str, Any]) -> dict[str, Any] | None:
        """Wait in a forming gang: its job (with `gang`, this worker's place) once all joined, else None."""
        job_id, token = join["job_id"], join["member_token"]
        log.info(
            "[%s] joined its gang (%s of %s); waiting for the rest", job_id, join["joined"], join["world"]
        )
        while not self._shutdown.is_set():
            try:
                answer = self.client.gang_wait(job_id, token, self.wait_seconds)
            except LeaseLost:
                return None
            if answer["state"] == "started":
                job: dict[str, Any] = answer["job"]
                job["gang"] = answer["gang"]
                log.info(
                    "[%s] gang started: node %s of %s",
                    job_id,
                    answer["gang"]["rank"],
                    answer["gang"]["world"],
                )
                return job
            if answer["state"] == "expired":
                log.info("[%s] the gang did not form in time; claiming again", job_id)
                return None
        return None  # shutting down: the join window lapses on the server

    # --- one attempt ----------------------------------------------------------------------------------

    def run_job(self, job: dict[str, Any]) -> str:
        """Run one claimed attempt to its end; returns how it ended.

        One of completed, failed, cancelled, released (handed back on shutdown) or dropped.
        """
        job_id, token = job["job_id"], job["lease_token"]
        workdir = self.workdir / job_id / f"attempt-{job['attempt']}"
        workdir.mkdir(parents=True, exist_ok=True)
        gang: dict[str, Any] | None = job.get("gang")
        member = gang is not None and int(gang["rank"]) > 0
        ctx = (GangMemberContext if member else RemoteJobContext)(
            job_id=job_id,
            job_type=job["type"],
            spec=job.get("spec") or {},
            workdir=workdir,
            device=self.device,
            attempt=int(job["attempt"]),
            client=self.client,
            lease_token=token,
            lease_seconds=float(job.get("lease_seconds") or 60),
            log_seq=int(job.get("log_seq") or 0),
            gang=gang,
        )
        with self._active_lock:
            self._active[job_id] = ctx
        if self._shutdown.is_set():
            ctx.request_stop("shutdown")
        ctx.start()
        try:
            return self._attempt(job, ctx)
        finally:
            ctx.close()
            with self._active_lock:
                self._active.pop(job_id, None)
            if not self.keep_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
                with contextlib.suppress(OSError):  # the job's folder goes too, once no attempt is left
                    workdir.parent.rmdir()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _attempt(self, job: dict[str, Any], ctx: RemoteJobContext) -> str:
        job_id, token = ctx.job_id, ctx.lease_token
        ctx.log(f"attempt {ctx.attempt} of {ctx.job_type} job on {self.worker_id} ({self.device})")
        try:
            handler = load_handler(ctx.job_type)
            ctx.check_stop()
            ctx.inputs = self._download_inputs(job, ctx.workdir / "inputs")
            ctx.resume_checkpoint = self._download_resume(job, ctx.workdir / "resume")
            ctx.check_stop()
            if isinstance(ctx, GangMemberContext):
                handler(ctx)
                log.info("[%s] gang node %s finished its share", job_id, ctx.gang and ctx.gang["rank"])
                return "member_done"  # rank 0's worker completes the job
            with wandb_run(ctx):
                result = handler(ctx)
        except JobStopped:
            if isinstance(ctx, GangMemberContext):
                return "dropped"  # rank 0 hands back, cancels or loses the attempt for the gang
            return self._stopped(ctx)
        except LeaseLost:
            log.warning("[%s] lease lost; dropping the job", job_id)
            return "dropped"
        except Exception as exc:
            if isinstance(ctx, GangMemberContext):
                # Only rank 0 may report; the group failing reaches it as well (or the lost lease does).
                log.error("[%s] gang node failed: %s\n%s", job_id, exc, traceback.format_exc())
                return "member_failed"
            if ctx.stop_reason == "shutdown":
                # e.g. the final checkpoint's upload gave up on an unreachable server: hand back
                # what the last uploaded checkpoint holds rather than report a failure.
                log.warning("[%s] stopping for shutdown: %s", job_id, exc)
                return self._stopped(ctx)
            failure = (
                Failure("invalid_config", str(exc), False)
                if isinstance(exc, UnknownJobType)
                else classify(exc)
            )
            log.error("[%s] failed: %s\n%s", job_id, failure.message, traceback.format_exc())
            return self._fail(ctx, failure)
        ctx.flush_quietly()
        try:
            self.client.complete(job_id, token, json_safe(result))
        except LeaseLost:
            log.warning("[%s] lease lost before complete; dropping the result", job_id)
            return "dropped"
        log.info("[%s] completed", job_id)
        return "completed"

    def _stopped(self, ctx: RemoteJobContext) -> str:
        if ctx.stop_reason == "lease_lost":
            log.warning("[%s] lease lost; dropping the job", ctx.job_id)
            return "dropped"
        if ctx.stop_reason == "cancelled":
            ctx.log("cancelled")
            ctx.flush_quietly()
            try:
                self.client.cancelled(ctx.job_id, ctx.lease_token)
            except LeaseLost:
                return "dropped"
            return "cancelled"
        # Shutdown: hand the job back (not a failure: no retry is used up); whatever was checkpointed
        # resumes on the next attempt. If the server cannot be reached, the lease expires there instead.
        ctx.log("worker shutting down: handing the job back")
        ctx.flush_quietly()
        try:
            self.client.release(ctx.job_id, ctx.lease_token)
        except LeaseLost:
            return "dropped"
        except Exception as err:  # the server stayed unreachable for the whole shutdown grace
            log.warning("[%s] could not hand the job back (%s); its lease will expire", ctx.job_id, err)
            return "dropped"
        log.info("[%s] handed back", ctx.job_id)
        return "released"

    def _fail(self, ctx: RemoteJobContext, failure: Failure) -> str:
        ctx.log(f"error ({failure.code}): {failure.message}", stream="stderr")
        ctx.flush_quietly()
        try:
            self.client.fail(ctx.job_id, ctx.lease_token, failure.code, failure.message, failure.retryable)
        except LeaseLost:
            return "dropped"
        return "failed"

    def _download_inputs(self, job: dict[str, Any], into: Path) -> dict[str, Path]:
        """Fetch every input; a role with one file maps to the file, else to a directory of its files."""
        by_role: dict[str, list[dict[str, Any]]] = {}
        for item in job.get("inputs") or []:
            by_role.setdefault(item["role"], []).append(item)
        paths: dict[str, Path] = {}
        for role, items in by_role.items():
            role_dir = into / role
            for item in items:
                # Names are flat per the protocol; Path.name keeps a hostile one inside role_dir anyway.
                dest = role_dir / Path(item["name"]).name
                self.client.download(
                    item["download_url"],
                    dest,
                    item.get("sha256"),
                    item.get("size_bytes"),
                    lease_token=job["lease_token"],
                )
            single = len(items) == 1 and role not in DIRECTORY_ROLES
            paths[role] = role_dir / Path(items[0]["name"]).name if single else role_dir
        return paths

    def _download_resume(self, job: dict[str, Any], into: Path) -> Path | None:
        resume = job.get("resume_from")
        if not resume:
            return None
        dest = into / f"{Path(resume['name']).name}.pt"
        return self.client.download(resume["download_url"], dest, lease_token=job["lease_token"])


__all__ = ["GangMemberContext", "ProtocolError", "RemoteJobContext", "Worker", "json_safe", "rfc3339"]
