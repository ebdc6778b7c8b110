"""Errors a job reports to the server, each with a stable code and whether a retry can help.

Handlers raise these for failures they understand; the runner maps anything else through
`classify()`: CUDA out-of-memory → `out_of_memory`, an upload the server refused as too large →
`payload_too_large` (not retryable), everything unexpected → `training_error`.
"""

from __future__ import annotations

from dataclasses import dataclass


class JobError(Exception):
    """A failure with a stable code. Subclasses fix `code` and `retryable`."""

    code = "training_error"
    retryable = True

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidConfig(JobError):
    """The job's spec asks for something this worker can never do; retrying cannot help."""

    code = "invalid_config"
    retryable = False


class InvalidDataset(JobError):
    """An input dataset is malformed (bad JSON, missing fields); retrying cannot help."""

    code = "invalid_dataset"
    retryable = False


class OutOfMemory(JobError):
    """The accelerator ran out of memory. Retryable: another worker (or a less busy GPU) may fit it."""

    code = "out_of_memory"
    retryable = True


@dataclass(frozen=True)
class Failure:
    code: str
    message: str
    retryable: bool


def classify(exc: BaseException) -> Failure:
    """How an exception escaping a handler is reported to the server."""
    if isinstance(exc, JobError):
        return Failure(exc.code, exc.message, exc.retryable)
    if _is_refused_upload(exc):
        # The server's size limit or storage quota will refuse the same upload on every attempt.
        return Failure("payload_too_large", f"the server refused an upload: {exc}", False)
    if _is_out_of_memory(exc):
        return Failure(
            "out_of_memory",
            f"out of memory: {exc}; lower batch_size or max_seq_length, or enable gradient checkpointing",
            True,
        )
    return Failure("training_error", f"{type(exc).__name__}: {exc}", True)


def _is_refused_upload(exc: BaseException) -> bool:
    from .client import ProtocolError  # the client imports nothing from here; keep it that way

    return isinstance(exc, ProtocolError) and exc.status == 413


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # Some CUDA/cuBLAS paths raise a plain RuntimeError with this text instead.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
