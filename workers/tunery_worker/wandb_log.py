"""Mirrors a job's metrics to Weights & Biases when its spec names `wandb_project`.

wandb is optional: it is imported only for such a job, and a worker without it (or whose wandb
cannot start a run, e.g. no API key) says so in a `wandb_unavailable` job event and trains anyway.
Where runs go is wandb's own environment on the worker: `WANDB_API_KEY`, `WANDB_MODE=offline` (the
run stays on the worker's disk), `WANDB_DIR`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tunery_worker.context import JobContext

log = logging.getLogger("tunery_worker")

# Spec keys holding credentials (`hf_token`, `teacher.api_key`, ...): never sent to W&B.
SECRET_KEY = re.compile(r"(token|api_key|secret|password)$", re.IGNORECASE)


def without_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_secrets(v) for k, v in value.items() if not SECRET_KEY.search(str(k))}
    if isinstance(value, list):
        return [without_secrets(v) for v in value]
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def metric_values(point: dict[str, Any]) -> dict[str, float | int]:
    """A metric point as W&B values: numbers keyed `<phase>/<field>` (train and eval stay apart), and
    the trainer's `step`, which every chart uses as its x axis."""
    phase = point.get("phase") or "train"
    values: dict[str, float | int] = {
        f"{phase}/{key}": value
        for key, value in point.items()
        if key not in ("step", "ts", "phase") and _is_number(value)
    }
    if isinstance(point.get("step"), int):
        values["step"] = point["step"]
    return values


def _start(ctx: JobContext, project: str) -> Any:
    """The job's W&B run, or None (with a job event saying why) when there is none."""
    try:
        import wandb  # lazily: only jobs that ask for W&B pay for importing it
    except ImportError:
        ctx.event(
            "wandb_unavailable",
            {"project": project, "message": "wandb is not installed on this worker; training continues"},
        )
        return None
    try:
        run = wandb.init(
            project=project,
            name=ctx.job_id,
            config=without_secrets(ctx.spec),
            # one worker may run several jobs at once: each gets its own run
            reinit="create_new",
            # the worker's stdout carries every job's logs; W&B gets metrics only
            settings=wandb.Settings(console="off"),
        )
    except Exception as err:  # e.g. online without an API key: W&B is optional, training is not
        ctx.event("wandb_unavailable", {"project": project, "message": f"wandb.init failed: {err}"})
        return None
    run.define_metric("*", step_metric="step")
    where = {"dir": run.settings.sync_dir} if run.offline else {"url": run.url}
    ctx.event("wandb_run", {"project": project, "run_id": run.id, **where})
    return run


@contextmanager
def wandb_run(ctx: JobContext) -> Iterator[None]:
    """Runs the body with every metric the job reports also logged to its W&B run, if it asked for one."""
    project = ctx.spec.get("wandb_project")
    run = _start(ctx, str(project)) if project else None
    if run is None:
        yield
        return

    def mirror(point: dict[str, Any]) -> None:
        try:
            run.log(metric_values(point))
        except Exception as err:  # a W&B hiccup must not fail the training step that reported
            log.warning("[%s] wandb log failed: %s", ctx.job_id, err)

    ctx.metric_listeners.append(mirror)
    exit_code = 1
    try:
        yield
        exit_code = 0
    finally:
        ctx.metric_listeners.remove(mirror)
        run.finish(exit_code=exit_code)
