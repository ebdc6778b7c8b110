"""Job handlers by job type.

A handler is `run(ctx: JobContext) -> dict` (the job's result). Handlers are named here as
"module:function" strings and imported on first use, so importing the registry stays cheap and a
module that fails to import (an optional dependency missing) only disables its own job type.
Adding a job type is one line in HANDLER_PATHS.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from tunery_worker.context import JobContext

Handler = Callable[[JobContext], dict[str, Any]]

HANDLER_PATHS: dict[str, str] = {
    "finetune": "tunery_worker.jobs.finetune:run",
    "merge": "tunery_worker.jobs.merge:run",
    "train": "tunery_worker.jobs.grow:run",
    "contract": "tunery_worker.jobs.contract:run",
    "distill": "tunery_worker.jobs.distill:run",
    "benchmark": "tunery_worker.jobs.benchmark:run",
    "prompt_optimize": "tunery_worker.jobs.prompt_optimize:run",
}


class UnknownJobType(LookupError):
    pass


def load_handler(job_type: str) -> Handler:
    """Import and return the handler for `job_type`; ImportError if its module cannot be imported."""
    try:
        module_name, function_name = HANDLER_PATHS[job_type].split(":")
    except KeyError:
        raise UnknownJobType(f"no handler for job type {job_type!r}") from None
    handler: Handler = getattr(importlib.import_module(module_name), function_name)
    return handler


def available_job_types() -> list[str]:
    """Job types whose handler imports on this machine: what the worker announces it can run."""
    available = []
    for job_type in HANDLER_PATHS:
        try:
            load_handler(job_type)
        except (ImportError, AttributeError):
            continue
        available.append(job_type)
    return available


class _LazyHandlers(dict[str, Handler]):
    """`HANDLERS[job_type]` imports the handler on first access and caches it."""

    def __missing__(self, job_type: str) -> Handler:
        handler = load_handler(job_type)
        self[job_type] = handler
        return handler

    def __contains__(self, job_type: object) -> bool:
        return job_type in HANDLER_PATHS


HANDLERS: dict[str, Handler] = _LazyHandlers()
