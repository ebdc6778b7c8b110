"""Data-parallel finetuning through torchrun on CPU (gloo, 2 processes) with a tiny model.

Each test that launches torchrun costs 10–25 s on a small machine (three Python processes import
torch and transformers); they run by default. Tolerances:

- DDP vs one process: the global batch, data order, seed and LR are the same, so the only
  difference is the order in which fp32 sums are taken (each rank's half of a micro-batch, then the
  all-reduce, versus one batched sum) — a relative error of a few ulps (~1e-7) per gradient. Adam
  turns gradients into steps of about lr per element, so over 16 steps at lr 1e-2 with weights of
  magnitude ~0.3 the drift stays around 1e-6 (measured: ~5e-7); 1e-5 leaves a 10× margin and is
  still far below one step's change (~1e-2).
- Resume with the same world size: the same processes, reduction order and per-rank random
  streams (dropout) replay the same arithmetic, so the weights match to 1e-6 (as in
  test_finetune's single-process resume test).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from test_finetune import final_adapter, make_ctx, memorization_set, train_losses

from tunery_worker.context import JobStopped, LocalJobContext
from tunery_worker.errors import InvalidConfig, InvalidDataset, JobError
from tunery_worker.jobs import ddp_entry, finetune

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)

DDP_VS_SINGLE_ATOL = 1e-5
STEPS = 16
SPEC: dict[str, Any] = {
    "training": {
        "max_steps": STEPS,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-2,
        "logging_steps": 1,
        "save_steps": 8,
    },
}


def spec(**overrides: Any) -> dict[str, Any]:
    merged = json.loads(json.dumps(SPEC))
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    return merged


def ddp(**extra: Any) -> dict[str, Any]:
    return {"enabled": True, "num_nodes": 1, **extra}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def live_processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text` (Linux /proc; empty elsewhere)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Any]:
    """The same job once in this process and once under torchrun with 2 gloo processes."""
    tmp = tmp_path_factory.mktemp("ddp")
    dataset = memorization_set(tmp)
    single = make_ctx(tmp, tiny_llama, dataset, "single", **spec())
    single_result = finetune.run(single)
    parallel = make_ctx(tmp, tiny_llama, dataset, "ddp", **spec(distributed=ddp()))
    started = time.perf_counter()
    parallel_result = finetune.run(parallel)
    return {
        "tmp": tmp,
        "dataset": dataset,
        "single": single,
        "single_result": single_result,
        "ddp": parallel,
        "ddp_result": parallel_result,
        "ddp_seconds": time.perf_counter() - started,
    }


def test_ddp_run_completes_and_loss_falls(runs: dict[str, Any]) -> None:
    ctx: LocalJobContext = runs["ddp"]
    result = runs["ddp_result"]
    losses = train_losses(ctx)
    assert losses[-1] <= losses[0] / 2, losses
    assert [m["step"] for m in ctx.metrics if m["phase"] == "train"] == list(range(1, STEPS + 1))
    assert result["steps"] == STEPS and result["loss_final"] == pytest.approx(losses[-1], rel=1e-4)
    assert result["ppl_final"] < result["ppl_baseline"]
    # The global batch does not depend on the number of processes: same examples, same tokens.
    assert result["tokens_processed"] == runs["single_result"]["tokens_processed"]
    assert ctx.logs[0]["text"].startswith("distributed: torchrun --standalone --nnodes=1 --nproc_per_node=2")
    assert ctx.phases[:4] == ["initializing", "loading_model", "data_preparation", "training"]
    assert ctx.phases[-2:] == ["evaluating", "saving"]
    assert ctx.progress["current_step"] == STEPS
    assert set(ctx.checkpoints) == {"checkpoint-8", "checkpoint-16"}
    assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json"} <= set(ctx.outputs)
    saved = json.loads(ctx.outputs["training_config.json"].read_text())
    assert saved["distributed"] == {
        "enabled": True,
        "num_nodes": 1,
        "nproc_per_node": 2,
        "timeout_s": 4 * 3600.0,
    }
    assert "hf_token" not in (ctx.workdir / "ddp" / "job.json").read_text()
    assert not list((ctx.workdir / "ddp" / "outbox").iterdir())  # durable, then deleted
    state = torch.load(ctx.checkpoints["checkpoint-8"][1], weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    # The two ranks draw different random streams (dropout) after the identical setup.
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])


def test_ddp_matches_the_single_process_run(runs: dict[str, Any]) -> None:
    single, parallel = final_adapter(runs["single"]), final_adapter(runs["ddp"])
    diff = max_abs_diff(single, parallel)
    print(f"max |DDP - single| over the adapter after {STEPS} steps: {diff:.3g}")
    assert diff <= DDP_VS_SINGLE_ATOL
    # ... and at the same magnitude as the weights' change, so equality is not trivial.
    assert max(float(t.abs().max()) for t in single.values()) > 0.05
    assert train_losses(runs["ddp"]) == pytest.approx(train_losses(runs["single"]), rel=1e-4)


def test_one_process_resumes_a_ddp_checkpoint(runs: dict[str, Any], tiny_llama: Path) -> None:
    # World size 2 → 1: weights, optimizer, schedule and data position carry over; with no dropout
    # the rest of the run is the single-process run's.
    ctx = make_ctx(runs["tmp"], tiny_llama, runs["dataset"], "resumed-single", **spec())
    ctx.resume_checkpoint = runs["ddp"].checkpoints["checkpoint-8"][1]
    result = finetune.run(ctx)
    assert result["steps"] == STEPS
    assert [m["step"] for m in ctx.metrics if m["phase"] == "train"][0] == 9
    assert ctx.events[0] == {"kind": "resumed", "payload": {"step": 8}}
    assert any("written by 2 processes, this run has 1" in line["text"] for line in ctx.logs)
    assert max_abs_diff(final_adapter(runs["single"]), final_adapter(ctx)) <= DDP_VS_SINGLE_ATOL


CTX_FIELDS = ("job_id", "job_type", "spec", "workdir", "inputs")


class StopAtStep(LocalJobContext):
    """Asks to stop once a training metric for `step` (or later) came back from rank 0."""

    stop_at_step: int = 3

    def should_stop(self) -> bool:
        return any(m["phase"] == "train" and m["step"] >= self.stop_at_step for m in self.metrics)


def as_stop_at_step(ctx: LocalJobContext, step: int) -> StopAtStep:
    stopping = StopAtStep(**{k: getattr(ctx, k) for k in CTX_FIELDS})
    stopping.stop_at_step = step
    return stopping


def test_cancel_stops_the_group_and_a_resume_continues_exactly(tmp_path: Path, tiny_llama: Path) -> None:
    # Dropout on: an exact resume needs every rank's own random stream back.
    lora = {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear", "bias": "none"}
    run_spec = spec(
        lora=lora, distributed=ddp(), training={"max_steps": 200, "save_steps": 2, "lr_scheduler": "constant"}
    )
    dataset = memorization_set(tmp_path)
    stopped = as_stop_at_step(make_ctx(tmp_path, tiny_llama, dataset, "stopped", **run_spec), 3)
    with pytest.raises(JobStopped):
        finetune.run(stopped)
    last = max(step for step, _ in stopped.checkpoints.values())
    # The stop landed soon after the request (a step or two here), and the steps done were checkpointed.
    print(f"stop requested after step 3 landed after step {last}")
    assert 3 <= last < 200 and f"checkpoint-{last}" in stopped.checkpoints
    assert max(m["step"] for m in stopped.metrics) == last
    assert "checkpoint-2" in stopped.checkpoints and not stopped.outputs
    assert not live_processes_mentioning(str(stopped.workdir / "ddp" / "job.json"))

    # Resume from step 2 under DDP and run to the step the stopped run reached: same state there.
    resumed_spec = json.loads(json.dumps(run_spec))
    resumed_spec["training"].update(max_steps=last, save_steps=last)
    resumed = make_ctx(tmp_path, tiny_llama, dataset, "resumed", **resumed_spec)
    resumed.resume_checkpoint = stopped.checkpoints["checkpoint-2"][1]
    result = finetune.run(resumed)
    assert result["steps"] == last
    assert [m["step"] for m in resumed.metrics if m["phase"] == "train"][0] == 3
    assert resumed.events[0] == {"kind": "resumed", "payload": {"step": 2}}
    want = torch.load(stopped.checkpoints[f"checkpoint-{last}"][1], weights_only=True)
    got = torch.load(resumed.checkpoints[f"checkpoint-{last}"][1], weights_only=True)
    assert got["step"] == want["step"] == last and got["position"] == want["position"]
    assert max_abs_diff(want["trainable"], got["trainable"]) <= 1e-6


def test_a_group_that_does_not_acknowledge_a_stop_is_terminated(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stop as soon as both ranks exist (they are still loading, far from a step): no acknowledgement
    # can come, so the parent sends SIGTERM, then SIGKILL, and nothing new is checkpointed.
    monkeypatch.setattr(ddp_entry, "STOP_ACK_S", 0.0)
    monkeypatch.setattr(ddp_entry, "KILL_GRACE_S", 5.0)

    class StopWhenRanksRun(LocalJobContext):
        def should_stop(self) -> bool:
            return len(list((self.workdir / "ddp").glob("rank*.pid"))) == 2

    base = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), "killed", **spec(distributed=ddp()))
    ctx = StopWhenRanksRun(**{k: getattr(base, k) for k in CTX_FIELDS})
    started = time.perf_counter()
    with pytest.raises(JobStopped):
        finetune.run(ctx)
    assert time.perf_counter() - started < 60
    assert not ctx.checkpoints and not ctx.outputs
    assert any("did not stop within" in line["text"] for line in ctx.logs)
    pids = [int(p.read_text()) for p in (ctx.workdir / "ddp").glob("rank*.pid")]
    assert len(pids) == 2
    for pid in pids:  # every rank is gone (or its pid went to some other program)
        cmdline = Path(f"/proc/{pid}/cmdline")
        assert not cmdline.exists() or b"ddp_entry" not in cmdline.read_bytes()
    assert not live_processes_mentioning(str(ctx.workdir / "ddp" / "job.json"))


def test_a_rank_error_reaches_the_worker_with_its_code(tmp_path: Path, tiny_llama: Path) -> None:
    # The dataset is only read inside the ranks: rank 0 reports the error, the worker re-raises it.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": 3}\n')
    ctx = make_ctx(tmp_path, tiny_llama, bad, distributed=ddp())
    with pytest.raises(InvalidDataset, match="line 2") as caught:
        finetune.run(ctx)
    assert caught.value.param == "dataset" and not caught.value.retryable
    assert not live_processes_mentioning(str(ctx.workdir / "ddp" / "job.json"))


# --- refusals and the report stream (no processes) -------------------------------------------------------


def test_several_nodes_outside_a_gang_are_refused(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), distributed=ddp(num_nodes=3))
    with pytest.raises(InvalidConfig) as caught:
        finetune.run(ctx)
    assert caught.value.param == "distributed" and caught.value.code == "invalid_config"
    assert "runs on a gang of 3 workers" in caught.value.message
    assert "not started as a member of one" in caught.value.message
    assert ctx.phases == ["initializing"] and not ctx.logs
    # a gang of another size is not this job's either
    ctx.gang = {"rank": 0, "world": 2, "master_addr": "127.0.0.1", "master_port": 29500}
    with pytest.raises(InvalidConfig, match="not started as a member"):
        finetune.run(ctx)


@pytest.mark.parametrize(
    ("distributed", "training", "param"),
    [
        (ddp(nproc_per_node=0), {}, "distributed"),
        (ddp(nproc_per_node="two"), {}, "distributed"),
        (ddp(nproc_per_node=4), {"batch_size": 2}, "training.batch_size"),
        (ddp(num_nodes=0), {}, "distributed"),
    ],
)
def test_bad_distributed_settings_are_invalid_config(
    tmp_path: Path, tiny_llama: Path, distributed: dict[str, Any], training: dict[str, Any], param: str
) -> None:
    ctx = make_ctx(
        tmp_path, tiny_llama, memorization_set(tmp_path), distributed=distributed, training=training
    )
    with pytest.raises(InvalidConfig) as caught:
        finetune.run(ctx)
    assert caught.value.param == param


def test_distributed_settings_resolve(tmp_path: Path, tiny_llama: Path) -> None:
    def resolved(distributed: Any) -> finetune.DistributedSettings:
        ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), distributed=distributed)
        return finetune.resolve_config(ctx).distributed

    assert resolved(None) == finetune.DistributedSettings(False, 1, 1)
    assert resolved({"enabled": False, "num_nodes": 4}).nproc_per_node == 1  # off: nothing else matters
    assert resolved(True).nproc_per_node == finetune.CPU_NPROC  # the public API's plain boolean
    assert resolved(ddp()).nproc_per_node == finetune.CPU_NPROC
    assert resolved(ddp(nproc_per_node=3)).nproc_per_node == 3
    if not torch.cuda.is_available():
        ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), distributed=ddp())
        ctx.device = "cuda"
        with pytest.raises(InvalidConfig, match="exceeds the 0 CUDA devices"):
            finetune.resolve_config(ctx)


def test_one_process_runs_in_this_process(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(
        tmp_path,
        tiny_llama,
        memorization_set(tmp_path),
        distributed=ddp(nproc_per_node=1),
        training={"max_steps": 2},
    )
    assert finetune.run(ctx)["steps"] == 2
    assert ctx.logs[0]["text"].startswith("distributed training with one process")
    assert not (ctx.workdir / "ddp").exists()


def test_forwarder_replays_reports_and_rebuilds_errors(tmp_path: Path) -> None:
    ctx = LocalJobContext(job_id="job_f", job_type="finetune", spec={}, workdir=tmp_path / "w")
    stream = tmp_path / "events.jsonl"
    checkpoint = tmp_path / "checkpoint-4.pt"
    checkpoint.write_bytes(b"state")
    lines = [
        {"op": "phase", "phase": "training", "progress": {"current_step": 4}},
        {"op": "log", "text": "step 4", "stream": "stdout"},
        {"op": "metric", "point": {"step": 4, "phase": "train", "loss": float("nan")}},
        {"op": "event", "kind": "resumed", "payload": {"step": 2}},
        {"op": "checkpoint", "name": "checkpoint-4", "step": 4, "path": str(checkpoint)},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    forwarder = ddp_entry._Forwarder(ctx, stream)
    stream.write_text(text[:-7])  # the last line is still being written
    forwarder.pump()
    assert not ctx.checkpoints and ctx.phases == ["training"] and ctx.logs[0]["text"] == "step 4"
    with open(stream, "a") as out:
        out.write(text[-7:])
    forwarder.pump()
    assert ctx.checkpoints["checkpoint-4"][0] == 4 and not checkpoint.exists()
    assert ctx.progress == {"current_step": 4} and ctx.events[0]["kind"] == "resumed"

    dataset_error = ddp_entry.rebuild_error(
        {"code": "invalid_dataset", "message": "line 2: bad", "param": "dataset", "retryable": False}
    )
    assert isinstance(dataset_error, InvalidDataset) and dataset_error.param == "dataset"
    other = ddp_entry.rebuild_error({"code": "out_of_memory", "message": "oom", "retryable": True})
    assert other.code == "out_of_memory" and other.retryable
    odd = ddp_entry.rebuild_error({"code": "teacher_error", "message": "x", "retryable": False})
    assert isinstance(odd, JobError) and (odd.code, odd.retryable) == ("teacher_error", False)


def test_ranks_shard_a_global_batch_without_gaps() -> None:
    examples = list(range(7))
    shards = [ddp_entry.Ranks(r, 3, r, "cpu").shard(examples) for r in range(3)]
    assert sorted(x for shard in shards for x in shard) == examples
    assert [len(s) for s in shards] == [3, 2, 2]


def test_the_child_context_reports_only_on_rank_0(tmp_path: Path) -> None:
    common: dict[str, Any] = {"job_id": "j", "job_type": "finetune", "spec": {}, "workdir": tmp_path}
    common["outbox"] = tmp_path
    stream = tmp_path / "events.jsonl"
    rank0 = ddp_entry.StreamContext(**common, stream=stream, stop_file=tmp_path / "stop")
    other = ddp_entry.StreamContext(**common, stream=None, stop_file=tmp_path / "stop")
    rank0.log("hello")
    other.log("quiet")
    assert not rank0.should_stop()
    (tmp_path / "stop").touch()
    assert rank0.should_stop() and rank0.should_stop()
    ops = [json.loads(line)["op"] for line in stream.read_text().splitlines()]
    assert ops == ["log", "stopping"]  # acknowledged once
    gone = ddp_entry.StreamContext(**common, stream=None, stop_file=tmp_path / "nope", parent_pid=2**22 + 7)
    assert gone.should_stop() == (not os.path.exists(f"/proc/{2**22 + 7}"))


def test_the_process_group_waits_as_long_as_the_job_allows(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    # Rank 0 alone evaluates, checkpoints and uploads while the others wait in a collective: the group
    # gets the job's timeout (a generous default), never torch's 10 minutes.
    seen: list[dict[str, Any]] = []

    def init_process_group(**kwargs: Any) -> None:
        seen.append(kwargs)
        raise RuntimeError("stopped before any collective")

    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    for timeout in (None, 1800):
        distributed = ddp(nproc_per_node=1, **({"timeout_s": timeout} if timeout else {}))
        ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), distributed=distributed)
        run_dir = tmp_path / f"run-{timeout}"
        run_dir.mkdir()
        job = {
            "job_id": ctx.job_id,
            "job_type": "finetune",
            "spec": ctx.spec,
            "workdir": str(ctx.workdir),
            "device": "cpu",
            "attempt": 1,
            "inputs": {k: str(v) for k, v in ctx.inputs.items()},
            "resume_checkpoint": None,
            "run_dir": str(run_dir),
        }
        (run_dir / "job.json").write_text(json.dumps(job))
        assert ddp_entry.main([str(run_dir / "job.json")]) == 1
    assert [s["timeout"] for s in seen] == [timedelta(hours=4), timedelta(seconds=1800)]


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.device_count() >= 2 and dist.is_nccl_available()),
    reason="needs 2 CUDA devices and NCCL",
)
def test_ddp_on_two_gpus(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(
        tmp_path,
        tiny_llama,
        memorization_set(tmp_path),
        distributed=ddp(nproc_per_node=2),
        training={"max_steps": STEPS, "save_steps": 8, "logging_steps": 1},
    )
    ctx.device = "cuda"
    result = finetune.run(ctx)
    losses = train_losses(ctx)
    assert result["steps"] == STEPS and losses[-1] <= losses[0] / 2, losses
