"""Data-parallel finetuning on one node: the worker launches torchrun; every rank runs finetune's loop.

Parent (the worker's process, `launch`): writes `ddp/job.json` (the spec without `hf_token`, which
travels in the environment), starts

    python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=K \\
        -m tunery_worker.jobs.ddp_entry <workdir>/ddp/job.json

in a session of its own, and forwards what rank 0 reports to the job's context until torchrun exits.
A gang node (`num_nodes` N > 1, the worker's place in `ctx.gang`) starts `--nnodes=N --node-rank=k
--master-addr=A --master-port=P --nproc_per_node=1` instead; only node 0's group has global rank 0,
so the other nodes forward nothing, and their clean exit is their whole result.

Rank 0 reports as JSON lines appended to `ddp/events.jsonl`, one object per context call: `{"op":
"log"|"metric"|"event"|"phase"|"checkpoint"|"output"|"stopping"|"result"|"stopped"|"error", ...}`.
A file, not the child's stdout: torchrun mixes every rank's output and library warnings into that.
A checkpoint is moved into `ddp/outbox/` and the parent deletes it once `ctx.save_checkpoint` has
made it durable; outputs are uploaded from where rank 0 wrote them. Other ranks report nothing,
except a failure (`ddp/error-rank<r>.json`).

Stop: when `ctx.should_stop()` turns true the parent creates `ddp/stop`. Rank 0 sees it at the next
step and all ranks agree (a broadcast), save a checkpoint of the steps done and exit, as the
single-process loop does; a stop that comes after the last step lets the job finish, as there.
If rank 0 has not acknowledged within `STOP_ACK_S` (a long step, or still loading), or the group
has not finished within `SAVE_GRACE_S` after acknowledging (or after training ended), the parent
ends the group: SIGTERM to torchrun's process group and to every rank, SIGKILL
`KILL_GRACE_S` later. Either way the last durable checkpoint stands and the job raises JobStopped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import tunery_worker
from tunery_worker.context import JobContext, JobStopped
from tunery_worker.errors import InvalidConfig, InvalidDataset, JobError, OutOfMemory, classify
from tunery_worker.jobs import finetune

STOP_ACK_S = 60.0  # after a stop request: how long rank 0 has to reach its next step
SAVE_GRACE_S = 900.0  # after rank 0 acknowledged the stop: how long the group has to checkpoint and exit
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL
POLL_S = 0.1  # how often the parent reads the report stream and checks for a stop
TAIL_LINES = 40  # lines of torchrun's output logged when the group fails without a report
HF_TOKEN_ENV = "TUNERY_HF_TOKEN"
ENTRY_MODULE = "tunery_worker.jobs.ddp_entry"


# --- inside each rank ------------------------------------------------------------------------------------


@dataclass
class Ranks:
    """This process's place in the group, and the few collectives finetune's loop needs."""

    rank: int
    world_size: int
    local_rank: int
    device: str

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        # DDP broadcasts rank 0's weights at construction and averages gradients in buckets during
        # backward; only parameters that require grad are reduced (a frozen LoRA base costs nothing).
        device_ids = [self.local_rank] if self.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def shard(self, examples: Sequence[Any]) -> list[Any]:
        """This rank's share of a global micro-batch: every world_size-th example from its rank on."""
        return list(examples[self.rank :: self.world_size])

    def sum(self, value: float) -> float:
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return float(tensor.item())

    def agree_to_stop(self, stop: bool) -> bool:
        """Rank 0's decision, on every rank: the group stops at the same step or not at all."""
        flag = torch.tensor([1 if stop else 0], dtype=torch.int32, device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (tensors and plain data), in rank order, on every rank."""
        # Through torch.save bytes: all_gather_object's own pickling of tensors does not load back
        # on every torch version, and weights_only keeps the exchange as safe as a checkpoint.
        buffer = io.BytesIO()
        torch.save(value, buffer)
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, buffer.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=True) for b in gathered]


@dataclass(eq=False)
class StreamContext(JobContext):
    """A rank's context: rank 0 appends its reports to the stream; other ranks keep quiet."""

    stream: Path | None = None  # None: this rank does not report
    stop_file: Path | None = None
    outbox: Path | None = None
    parent_pid: int | None = None
    _stopping: bool = False

    def emit(self, op: str, **fields: Any) -> None:
        if self.stream is None:
            return
        line = json.dumps({"op": op, **fields}, default=str) + "\n"
        with open(self.stream, "a", encoding="utf-8") as out:
            out.write(line)

    def log(self, text: str, stream: str = "stdout") -> None:
        self.emit("log", text=text, stream=stream)

    def record_metric(self, point: dict[str, Any]) -> None:
        self.emit("metric", point=point)

    def event(self, kind: str, payload: dict[str, Any] | None = None) -> None:
        self.emit("event", kind=kind, payload=payload or {})

    def set_phase(self, phase: str, progress: dict[str, Any] | None = None) -> None:
        self.emit("phase", phase=phase, progress=progress)

    def should_stop(self) -> bool:
        stop = bool(self.stop_file and self.stop_file.exists()) or not _alive(self.parent_pid)
        if stop and not self._stopping:
            self._stopping = True
            self.emit("stopping")  # the parent now waits for the checkpoint instead of killing
        return stop

    def save_checkpoint(self, name: str, step: int, path: Path) -> None:
        assert self.outbox is not None
        kept = self.outbox / path.name
        os.replace(path, kept)  # the loop deletes `path` next; the parent deletes `kept` once durable
        self.emit("checkpoint", name=name, step=step, path=str(kept))

    def upload_output(self, path: Path, name: str | None = None) -> None:
        self.emit("output", path=str(path), name=name)


def _alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """One rank, started by torchrun: `python -m tunery_worker.jobs.ddp_entry <job.json>`."""
    args = list(sys.argv[1:] if argv is None else argv)
    job = json.loads(Path(args[0]).read_text())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    run_dir = Path(job["run_dir"])
    (run_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
    spec = dict(job["spec"])
    if os.environ.get(HF_TOKEN_ENV):
        spec["hf_token"] = os.environ[HF_TOKEN_ENV]
    ctx = StreamContext(
        job_id=job["job_id"],
        job_type=job["job_type"],
        spec=spec,
        workdir=Path(job["workdir"]),
        device=job["device"],
        attempt=int(job["attempt"]),
        inputs={role: Path(p) for role, p in job["inputs"].items()},
        resume_checkpoint=Path(job["resume_checkpoint"]) if job["resume_checkpoint"] else None,
        gang=job.get("gang"),
        stream=run_dir / "events.jsonl" if rank == 0 else None,
        stop_file=run_dir / "stop",
        outbox=run_dir / "outbox",
        parent_pid=job.get("parent_pid"),
    )
    cuda = ctx.device.startswith("cuda")
    try:
        if cuda:
            torch.cuda.set_device(local_rank)
        cfg = finetune.resolve_config(ctx)
        # Ranks wait in a collective while rank 0 alone evaluates, checkpoints and uploads: the group's
        # timeout (NCCL's watchdog, gloo's wait) is the job's, not torch's 10 minutes.
        dist.init_process_group(
            backend="nccl" if cuda else "gloo", timeout=timedelta(seconds=cfg.distributed.timeout_s)
        )
        expected = (cfg.distributed.nproc_per_node or 1) * cfg.distributed.num_nodes
        if expected != world_size:
            raise InvalidConfig(
                f"torchrun started {world_size} processes, the spec resolves to {expected}",
                param="distributed",
            )
        if cuda:
            cfg.device = ctx.device = f"cuda:{local_rank}"
        result = finetune.train_and_save(ctx, cfg, Ranks(rank, world_size, local_rank, cfg.device))
        ctx.emit("result", result=result)
        dist.destroy_process_group()
        return 0
    except JobStopped:
        ctx.emit("stopped")
        return 0
    except Exception as exc:
        report = _error_report(exc)
        traceback.print_exc()
        if rank == 0:
            ctx.emit("error", **report)
        else:
            (run_dir / f"error-rank{rank}.json").write_text(json.dumps(report))
        # No destroy_process_group: the other ranks may be waiting in a collective; torchrun ends them.
        return 1


def _error_report(exc: BaseException) -> dict[str, Any]:
    failure = classify(exc)
    return {
        "code": failure.code,
        "message": failure.message,
        "retryable": failure.retryable,
        "param": getattr(exc, "param", None),
    }


# --- in the worker's process --------------------------------------------------------------------------


class RankFailed(JobError):
    """A rank failed with an error that has no class of its own here; code and retryable as it said."""

    def __init__(self, message: str, code: str = "training_error", retryable: bool = True) -> None:
        super().__init__(message)
        self.code, self.retryable = code, retryable


_ERROR_CLASSES: dict[str, type[JobError]] = {
    "invalid_config": InvalidConfig,
    "invalid_dataset": InvalidDataset,
    "out_of_memory": OutOfMemory,
}


def rebuild_error(report: dict[str, Any]) -> JobError:
    cls = _ERROR_CLASSES.get(report.get("code", ""))
    message = str(report.get("message") or "a distributed rank failed")
    if cls is not None:
        return cls(message, param=report.get("param"))
    code, retryable = str(report.get("code") or "training_error"), bool(report.get("retryable", True))
    return RankFailed(message, code, retryable)


def launch(ctx: JobContext, cfg: finetune.FinetuneConfig) -> dict[str, Any]:
    """Run the finetune job under torchrun on this node and return rank 0's result."""
    nproc = int(cfg.distributed.nproc_per_node or 1)
    run_dir = Path(ctx.workdir) / "ddp"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "outbox").mkdir(parents=True)
    (run_dir / "events.jsonl").touch()
    job_file = run_dir / "job.json"
    job = {
        "job_id": ctx.job_id,
        "job_type": ctx.job_type,
        "spec": {k: v for k, v in ctx.spec.items() if k != "hf_token"},  # the secret stays off disk
        "workdir": str(ctx.workdir),
        "device": ctx.device,
        "attempt": ctx.attempt,
        "inputs": {role: str(path) for role, path in ctx.inputs.items()},
        "resume_checkpoint": str(ctx.resume_checkpoint) if ctx.resume_checkpoint else None,
        "gang": ctx.gang,
        "run_dir": str(run_dir),
        "parent_pid": os.getpid(),
    }
    job_file.write_text(json.dumps(job))

    env = dict(os.environ)
    package_root = str(Path(tunery_worker.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # One share of the cores per process (torchrun would otherwise pick 1 and warn about it).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    if ctx.spec.get("hf_token"):
        env[HF_TOKEN_ENV] = str(ctx.spec["hf_token"])
    d = cfg.distributed
    if d.num_nodes > 1:
        # A gang: this worker is node `node_rank` of `num_nodes`; rank 0's worker hosts the static
        # rendezvous (torchrun's TCP store) at the address it gave the server when it joined.
        where = [
            f"--nnodes={d.num_nodes}", f"--node-rank={d.node_rank}",
            f"--master-addr={d.master_addr}", f"--master-port={d.master_port}",
        ]  # fmt: skip
    else:
        where = ["--standalone", "--nnodes=1"]
    command = [
        sys.executable, "-m", "torch.distributed.run", *where,
        f"--nproc_per_node={nproc}", "-m", ENTRY_MODULE, str(job_file),
    ]  # fmt: skip
    backend = "nccl" if ctx.device.startswith("cuda") else "gloo"
    ctx.log(f"distributed: torchrun {' '.join(where)} --nproc_per_node={nproc} ({backend})")
    with open(run_dir / "torchrun.log", "wb") as output:
        proc = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    group = _Group(proc, run_dir)
    try:
        return _supervise(ctx, group, member=d.num_nodes > 1 and d.node_rank > 0)
    finally:
        group.end()


@dataclass
class _Group:
    proc: subprocess.Popen[bytes]
    run_dir: Path

    def running(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        """SIGTERM torchrun's process group and every rank (each in a session of its own), then SIGKILL."""
        if not self.running() and not self._rank_pids():
            return
        self._signal(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        while time.monotonic() < deadline and (self.running() or self._rank_pids()):
            time.sleep(POLL_S)
        self._signal(signal.SIGKILL)
        self.proc.wait()

    def _signal(self, sig: signal.Signals) -> None:
        if self.running():
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in self._rank_pids():
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass

    def _rank_pids(self) -> list[int]:
        """Ranks still alive. A pid counts only while /proc says it runs this module (pids get reused)."""
        pids = []
        for pid_file in self.run_dir.glob("rank*.pid"):
            try:
                pid = int(pid_file.read_text())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except (OSError, ValueError):
                continue
            if ENTRY_MODULE.encode() in cmdline:
                pids.append(pid)
        return pids


class _Forwarder:
    """Replays rank 0's reports on the job's context."""

    def __init__(self, ctx: JobContext, stream: Path) -> None:
        self.ctx, self.stream = ctx, stream
        self._offset, self._partial = 0, b""
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.stopping = self.stopped = False
        self.finishing = False  # training is over; rank 0 evaluates and saves (no more stop checks)

    def pump(self) -> None:
        with open(self.stream, "rb") as source:
            source.seek(self._offset)
            chunk = source.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()  # an unfinished last line waits for the rest
        for line in lines:
            if line.strip():
                self.handle(json.loads(line))

    def handle(self, msg: dict[str, Any]) -> None:
        ctx, op = self.ctx, msg["op"]
        if op == "log":
            ctx.log(msg["text"], msg.get("stream", "stdout"))
        elif op == "metric":
            ctx.metric(msg["point"])
        elif op == "event":
            ctx.event(msg["kind"], msg.get("payload"))
        elif op == "phase":
            self.finishing = msg["phase"] in ("evaluating", "saving")
            ctx.set_phase(msg["phase"], msg.get("progress"))
        elif op == "checkpoint":
            self._checkpoint(msg["name"], int(msg["step"]), Path(msg["path"]))
        elif op == "output":
            ctx.upload_output(Path(msg["path"]), msg.get("name"))
        elif op == "stopping":
            self.stopping = True
        elif op == "stopped":
            self.stopped = True
        elif op == "result":
            self.result = msg["result"]
        elif op == "error":
            self.error = msg

    def _checkpoint(self, name: str, step: int, path: Path) -> None:
        try:
            self.ctx.save_checkpoint(name, step, path)
        except Exception as err:
            if not self.stopping:
                raise
            # As in the single-process loop: the lease may be gone already; the stop still wins.
            self.ctx.log(f"could not save a checkpoint while stopping: {err}", stream="stderr")
        finally:
            path.unlink(missing_ok=True)


def _supervise(ctx: JobContext, group: _Group, member: bool = False) -> dict[str, Any]:
    """Forward rank 0's reports until torchrun exits; its result. `member`: a gang node above 0,
    whose group has no rank 0 (nothing to forward) and whose clean exit is its whole result."""
    run_dir = group.run_dir
    forwarder = _Forwarder(ctx, run_dir / "events.jsonl")
    stop_requested: float | None = None
    ended = False
    while True:
        forwarder.pump()
        if not group.running():
            forwarder.pump()
            break
        if stop_requested is None and ctx.should_stop():
            (run_dir / "stop").touch()
            stop_requested = time.monotonic()
            if getattr(ctx, "stop_reason", None) == "lease_lost" and ctx.gang is not None and not ended:
                # The gang's attempt is over (a member was lost, or the job was taken back): no
                # checkpoint can be stored any more, and the other nodes are gone or going.
                group.end()
                ended = True
        if stop_requested is not None and not ended:
            waited = time.monotonic() - stop_requested
            # Acknowledged, or past the last step (as in one process, a late stop lets the job finish).
            if waited > (SAVE_GRACE_S if forwarder.stopping or forwarder.finishing else STOP_ACK_S):
                ctx.log(
                    f"the distributed group did not stop within {waited:.0f} s; terminating it "
                    "(the last saved checkpoint stands)",
                    stream="stderr",
                )
                group.end()
                ended = True
        time.sleep(POLL_S)

    code = group.proc.returncode
    if forwarder.result is not None and code == 0:
        return forwarder.result
    if member and code == 0 and stop_requested is None:
        return {}  # rank 0's worker reports the result
    if stop_requested is not None or forwarder.stopped:
        raise JobStopped(ctx.job_id)
    if forwarder.error is not None:
        raise rebuild_error(forwarder.error)
    for error_file in sorted(run_dir.glob("error-rank*.json")):
        raise rebuild_error(json.loads(error_file.read_text()))
    tail = _tail(run_dir / "torchrun.log")
    if tail:
        ctx.log(f"torchrun output (last {TAIL_LINES} lines):\n{tail}", stream="stderr")
    raise RankFailed(f"the distributed group exited with code {code} without a result")


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-TAIL_LINES:])


if __name__ == "__main__":
    sys.exit(main())
