"""The one interface between a job handler and the outside world.

A handler (`tunery_worker.jobs.<type>.run(ctx) -> dict`) reads its resolved spec and downloaded
inputs from the context, reports progress through it, and returns the job's result. The runner
gives it a `RemoteJobContext` (reports go to the server over HTTP); tests and offline runs use
`LocalJobContext`, which keeps everything in memory and on local disk.
"""

from __future__ import annotations

import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class JobStopped(Exception):
    """Raised inside a handler when the job must stop now (cancel requested or lease lost)."""


@dataclass
class JobContext(ABC):
    """Base context: the state every handler sees. Reporting methods are overridden by subclasses."""

    job_id: str
    job_type: str
    spec: dict[str, Any]
    workdir: Path
    device: str = "cpu"
    attempt: int = 1
    # Local paths of downloaded inputs, keyed by input role ("dataset", "adapter", "prompts", ...).
    inputs: dict[str, Path] = field(default_factory=dict)
    # Local path of the checkpoint to resume from, when the server handed one out.
    resume_checkpoint: Path | None = None
    # Called with every metric point after it is recorded (the W&B mirror, see wandb_log.py).
    metric_listeners: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)
    # A gang member's place (`num_nodes` > 1): {rank, world, master_addr, master_port}; None otherwise.
    gang: dict[str, Any] | None = None

    def metric(self, point: dict[str, Any]) -> None:
        self.record_metric(point)
        for listener in self.metric_listeners:
            listener(point)

    # --- reporting (each context implements these) ---------------------------------------------------
    @abstractmethod
    def log(self, text: str, stream: str = "stdout") -> None: ...

    @abstractmethod
    def record_metric(self, point: dict[str, Any]) -> None: ...

    @abstractmethod
    def event(self, kind: str, payload: dict[str, Any] | None = None) -> None: ...

    @abstractmethod
    def set_phase(self, phase: str, progress: dict[str, Any] | None = None) -> None: ...

    @abstractmethod
    def should_stop(self) -> bool:
        """True once the job was cancelled or the lease was lost; handlers check it every step."""
        ...

    @abstractmethod
    def save_checkpoint(self, name: str, step: int, path: Path) -> None:
        """Make a checkpoint file durable (uploaded before this returns)."""
        ...

    @abstractmethod
    def upload_output(self, path: Path, name: str | None = None) -> None:
        """Publish one output artifact file (flat name, defaults to the file's name)."""
        ...

    # --- helpers shared by every context ------------------------------------------------------
    def check_stop(self) -> None:
        if self.should_stop():
            raise JobStopped(self.job_id)

    def upload_dir(self, directory: Path, prefix: str = "") -> None:
        for path in sorted(p for p in directory.iterdir() if p.is_file()):
            self.upload_output(path, prefix + path.name)


@dataclass
class LocalJobContext(JobContext):
    """In-memory context for tests and offline runs: reports are kept in lists, files copied locally."""

    logs: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    # The latest progress given with set_phase (current_step, total_steps, current_loss, ...).
    progress: dict[str, Any] = field(default_factory=dict)
    checkpoints: dict[str, tuple[int, Path]] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    # Tests set this to stop the job after the given number of should_stop() calls.
    stop_after_checks: int | None = None
    _checks: int = 0

    def log(self, text: str, stream: str = "stdout") -> None:
        self.logs.append({"seq": len(self.logs) + 1, "ts": time.time(), "stream": stream, "text": text})

    def record_metric(self, point: dict[str, Any]) -> None:
        self.metrics.append(dict(point))

    def event(self, kind: str, payload: dict[str, Any] | None = None) -> None:
        self.events.append({"kind": kind, "payload": payload or {}})

    def set_phase(self, phase: str, progress: dict[str, Any] | None = None) -> None:
        self.phases.append(phase)
        if progress:
            self.progress = dict(progress)

    def should_stop(self) -> bool:
        self._checks += 1
        return self.stop_after_checks is not None and self._checks > self.stop_after_checks

    def save_checkpoint(self, name: str, step: int, path: Path) -> None:
        kept = self.workdir / "kept-checkpoints" / name
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        self.checkpoints[name] = (step, kept)

    def upload_output(self, path: Path, name: str | None = None) -> None:
        kept = self.workdir / "kept-outputs" / (name or path.name)
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        self.outputs[name or path.name] = kept
