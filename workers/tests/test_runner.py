"""The worker loop against a local fake server: attempts, cancel, lease loss, failures, shutdown, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_tunery import TOKEN, FakeTunery

from tunery_worker import cli, jobs
from tunery_worker.client import RetryPolicy, WorkerClient
from tunery_worker.context import JobContext
from tunery_worker.runner import RemoteJobContext, Worker, json_safe, rfc3339

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white"]
DATASET = "".join(
    json.dumps({"prompt": f"Q{i}: color of item {i}?", "completion": f" item {i} is {c}"}) + "\n"
    for i, c in enumerate(COLORS)
).encode()


@pytest.fixture
def server() -> Iterator[FakeTunery]:
    fake = FakeTunery().start()
    yield fake
    fake.stop()


@pytest.fixture
def worker(server: FakeTunery, tmp_path: Path) -> Iterator[Worker]:
    client = WorkerClient(
        server.url, TOKEN, retry=RetryPolicy(initial_delay=0.01, retry_seconds=5), timeout=10
    )
    yield Worker(client, device="cpu", workdir=tmp_path / "work", worker_id="test-worker", wait_seconds=0)
    client.close()


def finetune_spec(model_dir: Path, **training: Any) -> dict[str, Any]:
    return {
        "method": "lora",
        "base_model": {"name": "tiny", "source": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"},
        "training": {
            "max_steps": 12, "batch_size": 4, "learning_rate": 1e-2,
            "logging_steps": 4, "save_steps": 6, "seed": 1, **training,
        },
        "seed": 1,
        "output_name": "tiny-ft",
    }  # fmt: skip


def claim_and_run(worker: Worker) -> str:
    job = worker.client.claim(worker.worker_id, worker.capabilities(), 0)
    assert job is not None
    return worker.run_job(job)


def test_capabilities_on_cpu(worker: Worker) -> None:
    caps = worker.capabilities()
    assert {"finetune", "merge"} <= set(caps["job_types"])
    assert caps["methods"] == ["lora", "full"] and caps["device"] == "cpu" and caps["memory_gb"] > 0
    assert "gpu_name" not in caps


def test_a_finetune_job_runs_end_to_end(server: FakeTunery, worker: Worker, tiny_llama: Path) -> None:
    job_id = server.enqueue(
        "finetune", finetune_spec(tiny_llama), inputs=[("dataset", "train.jsonl", DATASET)], log_seq=7
    )
    assert claim_and_run(worker) == "completed"
    state = server.state

    result = state.completed[job_id]
    assert result["steps"] == 12 and result["adapter"]["name"] == "tiny-ft" and result["ppl_final"] > 0
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "training_config.json",
    } <= set(state.outputs[job_id])
    assert {name: step for name, (step, _) in state.checkpoints[job_id].items()} == {
        "checkpoint-6": 6,
        "checkpoint-12": 12,
    }
    # Log seq continues after what the server already holds, without gaps.
    seqs = sorted(state.logs[job_id])
    assert seqs == list(range(8, 8 + len(seqs)))
    assert any(line["text"].startswith("step 12/12 · loss") for line in server.log_lines(job_id))
    assert all(line["ts"].endswith("Z") for line in server.log_lines(job_id))
    steps = [p["step"] for p in state.metrics[job_id] if p["phase"] == "train"]
    assert steps == [1, 4, 8, 12]
    assert set(state.metrics[job_id][0]) <= {
        "step", "ts", "phase", "epoch", "loss", "lr", "grad_norm", "throughput", "vram_gb", "tokens",
    }  # fmt: skip
    assert state.phases[job_id][0] == "initializing" and "training" in state.phases[job_id]
    assert state.progress[job_id]["current_step"] == 12 and state.progress[job_id]["total_steps"] == 12
    assert [e["kind"] for e in state.events[job_id]].count("checkpoint") == 2
    assert not (worker.workdir / job_id).exists()  # attempt files are cleaned up


def test_resume_from_a_server_checkpoint(server: FakeTunery, worker: Worker, tiny_llama: Path) -> None:
    first = server.enqueue(
        "finetune", finetune_spec(tiny_llama), inputs=[("dataset", "train.jsonl", DATASET)]
    )
    assert claim_and_run(worker) == "completed"
    step, checkpoint = server.state.checkpoints[first]["checkpoint-6"]

    second = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama),
        inputs=[("dataset", "train.jsonl", DATASET)],
        resume=("checkpoint-6", step, checkpoint),
        attempt=2,
    )
    assert claim_and_run(worker) == "completed"
    assert server.state.completed[second]["steps"] == 12
    assert {"kind": "resumed"}.items() <= server.state.events[second][0].items()
    assert server.state.events[second][0]["payload"] == {"step": 6}
    # Same seed, same data, same state at step 6: the same adapter as the uninterrupted run.
    assert (
        server.state.outputs[second]["adapter_model.safetensors"]
        == server.state.outputs[first]["adapter_model.safetensors"]
    )


def test_merge_job_gets_a_directory_of_adapter_files(
    server: FakeTunery, worker: Worker, tiny_llama: Path
) -> None:
    trained = server.enqueue(
        "finetune", finetune_spec(tiny_llama), inputs=[("dataset", "train.jsonl", DATASET)]
    )
    claim_and_run(worker)
    adapter_files = [("adapter", name, data) for name, data in server.state.outputs[trained].items()]
    merged = server.enqueue(
        "merge",
        {"base_model": {"name": "tiny", "source": str(tiny_llama)}, "output_name": "m"},
        inputs=adapter_files,
    )
    assert claim_and_run(worker) == "completed"
    assert server.state.completed[merged]["model"] == {"name": "m"}
    assert "model.safetensors" in server.state.outputs[merged]


def test_cancel_stops_uploads_a_checkpoint_and_acknowledges(
    server: FakeTunery, worker: Worker, tiny_llama: Path
) -> None:
    job_id = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama, max_steps=100_000, save_steps=100_000, logging_steps=50),
        inputs=[("dataset", "train.jsonl", DATASET)],
        lease_seconds=3,  # a heartbeat every second
    )
    server.state.cancel.add(job_id)
    started = time.monotonic()
    assert claim_and_run(worker) == "cancelled"
    assert time.monotonic() - started < 30
    assert job_id in server.state.cancelled and job_id not in server.state.failed
    [(name, (step, _))] = server.state.checkpoints[job_id].items()
    assert name == f"checkpoint-{step}" and step > 0
    assert server.log_lines(job_id)[-1]["text"] == "cancelled"


def test_a_report_answer_delivers_a_cancel_before_the_next_heartbeat(
    server: FakeTunery, worker: Worker, tiny_llama: Path
) -> None:
    job_id = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama, max_steps=100_000, save_steps=100_000, logging_steps=1),
        inputs=[("dataset", "train.jsonl", DATASET)],
        lease_seconds=600,  # heartbeats every 200 s: only a report answer can deliver the cancel in time
    )
    threading.Timer(2.0, server.state.cancel.add, args=(job_id,)).start()
    started = time.monotonic()
    assert claim_and_run(worker) == "cancelled"
    assert time.monotonic() - started < 60
    assert not server.state.heartbeats or all(h["job_id"] != job_id for h in server.state.heartbeats)


def test_lost_lease_drops_the_job_silently(server: FakeTunery, worker: Worker, tiny_llama: Path) -> None:
    job_id = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama, max_steps=100_000, save_steps=100_000, logging_steps=50),
        inputs=[("dataset", "train.jsonl", DATASET)],
        lease_seconds=3,
    )
    threading.Timer(1.5, server.lose_lease, args=(job_id,)).start()
    assert claim_and_run(worker) == "dropped"
    state = server.state
    assert job_id not in state.completed and job_id not in state.failed and job_id not in state.cancelled
    assert not state.checkpoints[job_id]


def test_qlora_on_cpu_fails_as_invalid_config(server: FakeTunery, worker: Worker, tiny_llama: Path) -> None:
    spec = {**finetune_spec(tiny_llama), "method": "qlora"}
    job_id = server.enqueue("finetune", spec, inputs=[("dataset", "train.jsonl", DATASET)])
    assert claim_and_run(worker) == "failed"
    failure = server.state.failed[job_id]
    assert failure["error"]["code"] == "invalid_config" and failure["retryable"] is False
    assert "qlora" in failure["error"]["message"]
    assert server.log_lines(job_id)[-1]["stream"] == "stderr"


def test_bad_dataset_fails_as_invalid_dataset(server: FakeTunery, worker: Worker, tiny_llama: Path) -> None:
    job_id = server.enqueue(
        "finetune", finetune_spec(tiny_llama), inputs=[("dataset", "d.jsonl", b'{"text": 1}\n')]
    )
    assert claim_and_run(worker) == "failed"
    assert server.state.failed[job_id]["error"]["code"] == "invalid_dataset"
    assert "line 1" in server.state.failed[job_id]["error"]["message"]


def exploding_handler(ctx: JobContext) -> dict[str, Any]:
    ctx.log("about to fail")
    raise RuntimeError("boom")


def test_unexpected_errors_fail_retryable_as_training_error(
    server: FakeTunery, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(jobs.HANDLER_PATHS, "benchmark", f"{__name__}:exploding_handler")
    job_id = server.enqueue("benchmark", {})
    worker.job_types = ["benchmark"]
    assert claim_and_run(worker) == "failed"
    failure = server.state.failed[job_id]
    assert failure == {
        "error": {"code": "training_error", "message": "RuntimeError: boom"},
        "retryable": True,
    }
    assert [line["text"] for line in server.log_lines(job_id)][-2:] == [
        "about to fail",
        "error (training_error): RuntimeError: boom",
    ]


def quick_handler(ctx: JobContext) -> dict[str, Any]:
    return {"ok": True}


def run_until(worker: Worker, done: Any, timeout: float = 30) -> list[int]:
    """Run the worker in a thread until `done()` (or it exits by itself); return its exit code."""
    exit_codes: list[int] = []
    thread = threading.Thread(target=lambda: exit_codes.append(worker.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while thread.is_alive() and not done() and time.monotonic() < deadline:
        time.sleep(0.05)
    worker.request_shutdown()
    thread.join(timeout=timeout)
    assert not thread.is_alive()
    return exit_codes


@pytest.mark.parametrize("status", [404, 503])
def test_a_refused_outcome_report_does_not_stop_the_worker(
    server: FakeTunery, worker: Worker, monkeypatch: pytest.MonkeyPatch, status: int
) -> None:
    monkeypatch.setitem(jobs.HANDLER_PATHS, "benchmark", f"{__name__}:quick_handler")
    worker.job_types, worker.wait_seconds = ["benchmark"], 0.2
    worker.client.retry = RetryPolicy(initial_delay=0.01, retry_seconds=0)  # a 503 is final at once
    first, second = server.enqueue("benchmark", {}), server.enqueue("benchmark", {})
    server.fault("transition", status)  # the first job's /complete
    assert run_until(worker, lambda: second in server.state.completed) == [0]
    assert first not in server.state.completed and server.state.completed[second] == {"ok": True}


def test_an_unauthorized_outcome_report_stops_the_worker(
    server: FakeTunery, worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(jobs.HANDLER_PATHS, "benchmark", f"{__name__}:quick_handler")
    worker.job_types, worker.wait_seconds = ["benchmark"], 0.2
    server.enqueue("benchmark", {})
    second = server.enqueue("benchmark", {})
    server.fault("transition", 401)
    assert run_until(worker, lambda: False) == [2]  # exits by itself, as a bad token at claim does
    assert [job["job_id"] for job in server.state.queue] == [second]


def test_shutdown_checkpoints_and_hands_the_job_back(
    server: FakeTunery, worker: Worker, tiny_llama: Path
) -> None:
    job_id = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama, max_steps=100_000, save_steps=100_000, logging_steps=50),
        inputs=[("dataset", "train.jsonl", DATASET)],
    )

    def shutdown_once_training() -> None:
        while "training" not in server.state.phases.get(job_id, []):
            time.sleep(0.05)
        worker.request_shutdown()

    threading.Thread(target=shutdown_once_training, daemon=True).start()
    worker.once = True
    assert worker.run() == 0
    # Handed back, not failed: the server gives the attempt back instead of counting a retry.
    assert server.state.released == {job_id} and job_id not in server.state.failed
    assert len(server.state.checkpoints[job_id]) == 1


def test_reports_are_resent_after_a_failed_flush(server: FakeTunery, worker: Worker) -> None:
    job_id = server.enqueue("benchmark", {})
    job = worker.client.claim("w", {"job_types": ["benchmark"], "device": "cpu"}, 0)
    assert job is not None
    ctx = RemoteJobContext(
        job_id=job_id, job_type="benchmark", spec={}, workdir=Path("."), client=worker.client,
        lease_token=job["lease_token"], log_seq=0,
    )  # fmt: skip
    ctx.log("one\ntwo")
    ctx.metric({"step": 1, "loss": float("nan"), "phase": "train", "extra": 1})
    ctx.set_phase("training", {"current_step": 1, "current_loss": None})
    server.fault("metrics", 400)
    with pytest.raises(Exception, match="400"):
        ctx.flush()
    ctx.flush()
    assert [line["text"] for line in server.log_lines(job_id)] == ["one", "two"]
    [point] = server.state.metrics[job_id]
    assert point["loss"] is None and "extra" not in point and point["ts"].endswith("Z")
    assert server.state.phases[job_id] == ["training"] and server.state.progress[job_id] == {
        "current_step": 1
    }


def test_once_exits_when_the_queue_is_empty(worker: Worker) -> None:
    worker.once = True
    assert worker.run() == 0


def test_helpers() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert json_safe({"a": [float("inf"), 1.5], "b": Path("/x")}) == {"a": [None, 1.5], "b": "/x"}


# --- the command line -----------------------------------------------------------------------------------


def test_cli_runs_without_the_run_subcommand(server: FakeTunery, tmp_path: Path) -> None:
    args = ["--server", server.url, "--token", TOKEN, "--device", "cpu", "--once", "--wait-seconds", "0"]
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 0
    assert cli.main(["run", *args, "--workdir", str(tmp_path)]) == 0
    assert len(server.state.claims) == 2


def test_cli_reads_server_and_token_from_the_environment(
    server: FakeTunery, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TUNERY_SERVER_URL", server.url)
    monkeypatch.setenv("TUNERY_WORKER_TOKEN", TOKEN)
    assert cli.main(["--once", "--wait-seconds", "0", "--device", "cpu", "--workdir", str(tmp_path)]) == 0


def test_cli_bad_token_exits_nonzero(server: FakeTunery, tmp_path: Path) -> None:
    args = ["--server", server.url, "--token", "wrong", "--device", "cpu", "--wait-seconds", "0"]
    assert cli.main([*args, "--workdir", str(tmp_path)]) == 2


def test_cli_requires_a_server_and_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNERY_SERVER_URL", raising=False)
    monkeypatch.delenv("TUNERY_WORKER_TOKEN", raising=False)
    with pytest.raises(SystemExit) as caught:
        cli.main(["--device", "cpu"])
    assert caught.value.code == 2


def test_cli_makes_a_tiny_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["make-tiny-model", str(tmp_path / "m"), "--arch", "qwen2", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "qwen2"
    assert capsys.readouterr().out.strip() == str(tmp_path / "m")


def test_sigterm_checkpoints_and_hands_the_job_back(
    server: FakeTunery, tiny_llama: Path, tmp_path: Path
) -> None:
    """The real entry point in a subprocess, as an operator runs it: SIGTERM mid-training."""
    job_id = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama, max_steps=100_000, save_steps=100_000, logging_steps=50),
        inputs=[("dataset", "train.jsonl", DATASET)],
    )
    command = [sys.executable, "-m", "tunery_worker.cli", "--server", server.url, "--token", TOKEN]
    command += ["--device", "cpu", "--once", "--wait-seconds", "5", "--workdir", str(tmp_path / "w")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=Path(__file__).parents[1], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        while "training" not in server.state.phases.get(job_id, []):
            assert process.poll() is None and time.monotonic() < deadline, (
                process.stderr and process.stderr.read()
            )
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert server.state.released == {job_id} and job_id not in server.state.failed
    assert len(server.state.checkpoints[job_id]) == 1


def start_cli_worker(server: FakeTunery, tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tunery_worker.cli", "--server", server.url, "--token", TOKEN]
    command += ["--device", "cpu", "--once", "--wait-seconds", "5", "--workdir", str(tmp_path / "w"), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=Path(__file__).parents[1], env=env, stderr=subprocess.PIPE, text=True
    )


def training_with_server_gone(server: FakeTunery, tiny_llama: Path, process: subprocess.Popen[str]) -> str:
    """Waits until the worker trains a long job, then takes the server down."""
    job_id = server.enqueue(
        "finetune",
        finetune_spec(tiny_llama, max_steps=100_000, save_steps=100_000, logging_steps=50),
        inputs=[("dataset", "train.jsonl", DATASET)],
    )
    deadline = time.monotonic() + 60
    while "training" not in server.state.phases.get(job_id, []):
        assert process.poll() is None and time.monotonic() < deadline, (
            process.stderr and process.stderr.read()
        )
        time.sleep(0.1)
    server.go_down()
    return job_id


def test_sigterm_with_the_server_down_exits_after_the_grace(
    server: FakeTunery, tiny_llama: Path, tmp_path: Path
) -> None:
    """The hand-back cannot reach the server: the worker gives up after --shutdown-grace and exits."""
    process = start_cli_worker(server, tmp_path, "--shutdown-grace", "3")
    try:
        job_id = training_with_server_gone(server, tiny_llama, process)
        process.send_signal(signal.SIGTERM)
        # Without the bound, the client retries for its full 300 s at every step of the hand-back.
        assert process.wait(timeout=90) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert job_id not in server.state.released and job_id not in server.state.failed


def test_a_second_sigterm_exits_at_once(server: FakeTunery, tiny_llama: Path, tmp_path: Path) -> None:
    process = start_cli_worker(server, tmp_path, "--shutdown-grace", "600")
    try:
        training_with_server_gone(server, tiny_llama, process)
        process.send_signal(signal.SIGTERM)
        # Signals of one kind do not queue: the second is sent once the first was handled.
        assert process.stderr is not None
        for line in process.stderr:
            if "shutting down" in line:
                break
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B writes its runs under the returned folder and reaches nothing on the network."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return tmp_path


def test_a_job_with_wandb_project_logs_its_metrics_to_a_wandb_run(
    server: FakeTunery, worker: Worker, tiny_llama: Path, wandb_offline: Path
) -> None:
    spec = {**finetune_spec(tiny_llama, max_steps=4), "wandb_project": "tunery-test", "hf_token": "hf_secret"}
    job_id = server.enqueue("finetune", spec, inputs=[("dataset", "train.jsonl", DATASET)])
    assert claim_and_run(worker) == "completed"

    [event] = [e for e in server.state.events[job_id] if e["kind"].startswith("wandb")]
    assert event["kind"] == "wandb_run" and event["payload"]["project"] == "tunery-test"
    run_dir = Path(event["payload"]["dir"])
    assert run_dir.parent == wandb_offline / "wandb" and run_dir.name.startswith("offline-run-")
    [records] = list(run_dir.glob("run-*.wandb"))
    data = records.read_bytes()
    assert job_id.encode() in data  # the run is named after the job
    assert b"train/loss" in data and b"train/grad_norm" in data  # the trainer's metrics were logged
    assert b"hf_secret" not in data  # the config went without secrets


def test_without_wandb_a_job_says_so_and_trains(
    server: FakeTunery, worker: Worker, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    spec = {**finetune_spec(tiny_llama, max_steps=2), "wandb_project": "tunery-test"}
    job_id = server.enqueue("finetune", spec, inputs=[("dataset", "train.jsonl", DATASET)])
    assert claim_and_run(worker) == "completed"
    [event] = [e for e in server.state.events[job_id] if e["kind"].startswith("wandb")]
    assert event["kind"] == "wandb_unavailable" and "not installed" in event["payload"]["message"]
