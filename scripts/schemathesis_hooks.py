"""Schemathesis hooks for scripts/schemathesis.sh (loaded through the generated schemathesis.toml).

`POST /v1/workers/claim` (and a serving worker's `/v1/workers/inference/claim`) long-polls up
to `wait_seconds` (default 20) when no job matches. Generated
claims rarely match a pending job, so every valid-looking claim would sit out its whole wait and the
run would spend its time asleep. Here a claim's wait is pinned to 0; everything else about the
generated body (including invalid values, which the server must reject at once) is left alone.

A job's live stream (`GET …/stream`) runs until the job ends or `max_seconds` (default 300) pass, and
the seeded running job never ends: its `max_seconds` is pinned to 0 (send what is recorded, then end).

The run's own worker token (SCHEMATHESIS_PROTECTED_KEY_IDS) is never revoked: a stateful scenario
that lists keys and revokes one would otherwise stop the serving worker the user run relies on; such
a revoke is sent for an id that does not exist instead (a 404, still checked against the spec).
"""

import os
from typing import Any

import schemathesis

# Claims that long-poll up to `wait_seconds` (default 20) when nothing is waiting.
LONG_POLLS = ("POST /v1/workers/claim", "POST /v1/workers/inference/claim")
REVOKE = "POST /v1/admin/keys/{key_id}/revoke"
PROTECTED_KEY_IDS = {
    key
    for key in os.environ.get("SCHEMATHESIS_PROTECTED_KEY_IDS", "").split(",")
    if key
}


@schemathesis.hook
def before_call(context: Any, case: Any, **kwargs: Any) -> None:
    if case.operation.label == REVOKE:
        spare_protected_key(case)
        return
    if case.operation.label.endswith("/stream"):
        pin_stream_duration(case)
        return
    if case.operation.label not in LONG_POLLS or not isinstance(case.body, dict):
        return
    wait = case.body.get("wait_seconds", 0)
    if isinstance(wait, int | float) and not isinstance(wait, bool) and 0 <= wait <= 30:
        case.body["wait_seconds"] = 0


def pin_stream_duration(case: Any) -> None:
    query = case.query if isinstance(case.query, dict) else {}
    seconds = query.get("max_seconds", 300)
    if (
        isinstance(seconds, int)
        and not isinstance(seconds, bool)
        and 0 <= seconds <= 3600
    ):
        query["max_seconds"] = 0
        case.query = query


def spare_protected_key(case: Any) -> None:
    params = case.path_parameters if isinstance(case.path_parameters, dict) else {}
    if params.get("key_id") in PROTECTED_KEY_IDS:
        params["key_id"] = "key_spared_by_schemathesis_hooks"
        case.path_parameters = params
