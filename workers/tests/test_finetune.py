"""The finetune handler on tiny CPU models: learning, exact resume, cancel, refusals, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_data import STRICT_TEMPLATE

from tunery_worker.context import JobStopped, LocalJobContext
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import finetune

COLORS = ["red", "green", "blue", "yellow", "orange", "purple", "black", "white"]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def memorization_set(tmp_path: Path) -> Path:
    records = [
        {"prompt": f"Q{i}: color of item {i}?", "completion": f" item {i} is {c}"}
        for i, c in enumerate(COLORS)
    ]
    return write_jsonl(tmp_path / "dataset.jsonl", records)


def make_ctx(
    tmp_path: Path, model_dir: Path, dataset: Path, name: str = "run", **spec: Any
) -> LocalJobContext:
    training = {
        "max_steps": 40,
        "batch_size": 4,
        "learning_rate": 1e-2,
        "lr_scheduler": "constant",
        "logging_steps": 5,
        "save_steps": 1000,
        "seed": 7,
    }
    training.update(spec.pop("training", {}))
    full_spec = {
        "method": "lora",
        "base_model": {"name": "tiny", "source": str(model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear", "bias": "none"},
        "training": training,
        "output_name": "tiny-ft",
        **spec,
    }
    return LocalJobContext(
        job_id=f"job_{name}",
        job_type="finetune",
        spec=full_spec,
        workdir=tmp_path / name,
        inputs={"dataset": dataset},
    )


def train_losses(ctx: LocalJobContext) -> list[float]:
    return [m["loss"] for m in ctx.metrics if m["phase"] == "train"]


@pytest.mark.parametrize(
    ("arch", "method", "lr"),
    [("llama", "lora", 1e-2), ("qwen2", "lora", 1e-2), ("llama", "full", 3e-3)],
)
def test_loss_halves_on_a_memorization_set(
    tmp_path: Path, request: pytest.FixtureRequest, arch: str, method: str, lr: float
) -> None:
    model_dir = request.getfixturevalue(f"tiny_{arch}")
    ctx = make_ctx(
        tmp_path, model_dir, memorization_set(tmp_path), method=method, training={"learning_rate": lr}
    )
    result = finetune.run(ctx)

    losses = train_losses(ctx)
    assert losses[-1] <= losses[0] / 2, losses
    assert result["steps"] == 40 and result["loss_final"] == pytest.approx(losses[-1], rel=1e-4)
    assert result["ppl_final"] < result["ppl_baseline"] and result["ppl_delta_pct"] < -50
    assert result["tokens_processed"] > 0 and result["train_seconds"] > 0
    if method == "lora":
        assert {"adapter_model.safetensors", "adapter_config.json", "training_config.json"} <= set(
            ctx.outputs
        )
        assert result["adapter"]["name"] == "tiny-ft" and result["model"] is None
        assert result["adapter"]["size_bytes"] == ctx.outputs["adapter_model.safetensors"].stat().st_size
        assert 0 < result["params_trainable"] < result["params_before"]
    else:
        assert {"model.safetensors", "config.json", "training_config.json"} <= set(ctx.outputs)
        assert result["model"] == {"name": "tiny-ft"} and result["adapter"] is None
        assert result["params_trainable"] == result["params_before"] == result["params_after"]
    assert "tokenizer.json" in ctx.outputs and "README.md" not in ctx.outputs
    saved = json.loads(ctx.outputs["training_config.json"].read_text())
    assert saved["method"] == method and saved["training"]["learning_rate"] == lr


def test_reports_metrics_logs_and_progress(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(
        tmp_path,
        tiny_llama,
        memorization_set(tmp_path),
        training={"max_steps": 6, "logging_steps": 2, "eval_steps": 3, "eval_split": 0.25, "save_steps": 3},
    )
    result = finetune.run(ctx)

    train_points = [m for m in ctx.metrics if m["phase"] == "train"]
    assert [m["step"] for m in train_points] == [1, 2, 4, 6]
    for point in train_points:
        assert {"epoch", "loss", "lr", "grad_norm", "throughput", "vram_gb", "tokens", "ts"} <= set(point)
    # eval at step 3, then once at the end (step 6 is not evaluated twice)
    assert [m["step"] for m in ctx.metrics if m["phase"] == "eval"] == [3, 6]
    assert result["eval_loss_final"] is not None
    assert any(line["text"].startswith("step 6/6 · loss ") for line in ctx.logs)
    assert ctx.progress["current_step"] == 6 and ctx.progress["total_steps"] == 6
    assert set(ctx.checkpoints) == {"checkpoint-3", "checkpoint-6"}
    assert ctx.phases[:4] == ["initializing", "loading_model", "data_preparation", "training"]
    assert ctx.phases[-2:] == ["evaluating", "saving"]


def test_epochs_set_the_number_of_steps(tmp_path: Path, tiny_llama: Path) -> None:
    # 8 examples, 2 per micro-batch, 2 micro-batches per step → 2 steps per epoch; 1.5 epochs → 3 steps
    ctx = make_ctx(
        tmp_path,
        tiny_llama,
        memorization_set(tmp_path),
        training={"max_steps": -1, "num_epochs": 1.5, "batch_size": 2, "gradient_accumulation_steps": 2},
    )
    assert finetune.run(ctx)["steps"] == 3


def final_adapter(ctx: LocalJobContext) -> dict[str, torch.Tensor]:
    return load_file(str(ctx.outputs["adapter_model.safetensors"]))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path: Path, tiny_llama: Path) -> None:
    # Dropout, accumulation, an eval split and batches that straddle epochs: every source of state.
    spec: dict[str, Any] = {
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj", "down_proj"]},
        "training": {
            "max_steps": 10,
            "batch_size": 3,
            "gradient_accumulation_steps": 2,
            "eval_split": 0.25,
            "lr_scheduler": "cosine",
            "warmup_steps": 2,
            "weight_decay": 0.01,
            "save_steps": 4,
        },
    }
    dataset = memorization_set(tmp_path)
    whole = make_ctx(tmp_path, tiny_llama, dataset, "whole", **json.loads(json.dumps(spec)))
    expected = finetune.run(whole)

    # Cancelled before step 7: the stop path checkpoints the 6 steps done.
    stopped = make_ctx(tmp_path, tiny_llama, dataset, "stopped", **json.loads(json.dumps(spec)))
    stopped.stop_after_checks = 6
    with pytest.raises(JobStopped):
        finetune.run(stopped)
    assert set(stopped.checkpoints) == {"checkpoint-4", "checkpoint-6"}
    assert "adapter_model.safetensors" not in stopped.outputs

    for name in ("checkpoint-6", "checkpoint-4"):
        resumed = make_ctx(tmp_path, tiny_llama, dataset, f"resumed-{name}", **json.loads(json.dumps(spec)))
        resumed.resume_checkpoint = stopped.checkpoints[name][1]
        result = finetune.run(resumed)
        assert result["steps"] == 10
        assert result["tokens_processed"] == expected["tokens_processed"]
        assert result["ppl_baseline"] == expected["ppl_baseline"]
        want, got = final_adapter(whole), final_adapter(resumed)
        assert want.keys() == got.keys()
        for key in want:
            assert torch.allclose(want[key], got[key], atol=1e-6, rtol=0), key
        assert [m["step"] for m in resumed.metrics if m["phase"] == "train"][0] > int(name.split("-")[1])
        assert resumed.events[0] == {"kind": "resumed", "payload": {"step": int(name.split("-")[1])}}


def test_a_crash_after_training_resumes_from_the_last_step(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 5 steps with save_steps 3: the end of training is checkpointed too, so nothing is redone.
    dataset = memorization_set(tmp_path)
    training = {"max_steps": 5, "save_steps": 3, "logging_steps": 1}
    whole = make_ctx(tmp_path, tiny_llama, dataset, "whole", training=training)
    finetune.run(whole)
    assert {name: step for name, (step, _) in whole.checkpoints.items()} == {
        "checkpoint-3": 3,
        "checkpoint-5": 5,
    }

    crashed = make_ctx(tmp_path, tiny_llama, dataset, "crashed", training=training)
    with monkeypatch.context() as patch:
        patch.setattr(finetune.Finetune, "final_eval", lambda self: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            finetune.run(crashed)
    resumed = make_ctx(tmp_path, tiny_llama, dataset, "resumed", training=training)
    resumed.resume_checkpoint = crashed.checkpoints["checkpoint-5"][1]
    result = finetune.run(resumed)
    assert result["steps"] == 5 and not train_losses(resumed)  # no step ran again
    assert not resumed.checkpoints  # and nothing new needed saving
    want, got = final_adapter(whole), final_adapter(resumed)
    assert all(torch.equal(want[key], got[key]) for key in want)


def test_rng_state_keeps_only_the_training_device_cuda_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    # A fake CUDA runtime: per-GPU generator states; the *_all functions go by position, as torch's do.
    gpus = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}

    def index(device: str | int = "cuda") -> int:
        return device if isinstance(device, int) else (torch.device(device).index or 0)

    def set_state(state: torch.Tensor, device: str | int = "cuda") -> None:
        if index(device) not in gpus:
            raise IndexError(f"no GPU {device}")
        gpus[index(device)] = state.clone()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpus[index(device)].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [gpus[i].clone() for i in sorted(gpus)])
    monkeypatch.setattr(
        torch.cuda, "set_rng_state_all", lambda states: [set_state(s, i) for i, s in enumerate(states)]
    )

    saved = finetune.rng_state("cuda:1")  # trained on the second GPU of two
    del gpus[1]
    gpus[0] = torch.tensor([9], dtype=torch.uint8)
    finetune.set_rng_state(saved, "cuda:0")  # resumed on a one-GPU worker
    assert gpus[0].tolist() == [1]

    # A CPU run's checkpoint has no CUDA stream, and an older one a list of every GPU's: both leave
    # the training device's stream as seeded.
    on_cpu = finetune.rng_state("cpu")
    assert "cuda" not in on_cpu
    finetune.set_rng_state(on_cpu, "cuda:0")
    finetune.set_rng_state({**on_cpu, "cuda": [torch.tensor([5], dtype=torch.uint8)] * 2}, "cuda:0")
    assert gpus[0].tolist() == [1]


def test_resume_refuses_a_checkpoint_with_other_batching(tmp_path: Path, tiny_llama: Path) -> None:
    dataset = memorization_set(tmp_path)
    first = make_ctx(tmp_path, tiny_llama, dataset, "first", training={"max_steps": 2, "save_steps": 2})
    finetune.run(first)
    other = make_ctx(tmp_path, tiny_llama, dataset, "other", training={"max_steps": 4, "batch_size": 2})
    other.resume_checkpoint = first.checkpoints["checkpoint-2"][1]
    with pytest.raises(InvalidConfig, match="batch_size"):
        finetune.run(other)


def test_cancel_stops_within_one_step_and_keeps_a_checkpoint(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), training={"logging_steps": 1})
    ctx.stop_after_checks = 3
    with pytest.raises(JobStopped):
        finetune.run(ctx)
    assert max(m["step"] for m in ctx.metrics) == 3
    assert list(ctx.checkpoints) == ["checkpoint-3"] and ctx.checkpoints["checkpoint-3"][0] == 3
    assert not ctx.outputs


def test_qlora_on_cpu_is_refused_before_any_work(tmp_path: Path, tiny_llama: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine could run QLoRA")
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), method="qlora")
    with pytest.raises(InvalidConfig) as caught:
        finetune.run(ctx)
    assert caught.value.code == "invalid_config" and not caught.value.retryable
    assert caught.value.param == "method" and "CUDA" in caught.value.message
    assert ctx.phases == ["initializing"] and not ctx.logs and not ctx.metrics


@pytest.mark.parametrize(
    ("spec", "param"),
    [
        ({"method": "dora"}, "method"),
        ({"training": {"batch_size": 0}}, "training.batch_size"),
        ({"training": {"lr_scheduler": "step"}}, "training.lr_scheduler"),
        ({"training": {"eval_split": 1.0}}, "training.eval_split"),
        ({"lora": {"bias": "some"}}, "lora.bias"),
        ({"distributed": {"enabled": True, "num_nodes": 2}}, "distributed"),
    ],
)
def test_unsupported_settings_are_invalid_config(
    tmp_path: Path, tiny_llama: Path, spec: dict[str, Any], param: str
) -> None:
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), **spec)
    with pytest.raises(InvalidConfig) as caught:
        finetune.run(ctx)
    assert caught.value.param == param


def test_api_lora_names_and_unknown_keys_are_accepted(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path))
    ctx.spec["lora"] = {"r": 4, "lora_alpha": 4, "lora_dropout": 0.0, "task_type": "CAUSAL_LM"}
    cfg = finetune.resolve_config(ctx)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (4, 4, 0.0)
    assert cfg.use_bf16 is False  # bf16 defaults on, and is dropped on CPU


def test_bad_dataset_is_invalid_dataset_with_line_number(tmp_path: Path, tiny_llama: Path) -> None:
    dataset = tmp_path / "bad.jsonl"
    dataset.write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(InvalidDataset, match="line 2"):
        finetune.run(make_ctx(tmp_path, tiny_llama, dataset))


def test_a_conversation_the_chat_template_rejects_is_invalid_dataset(
    tmp_path: Path, tiny_llama: Path
) -> None:
    model_dir = tmp_path / "strict-model"
    shutil.copytree(tiny_llama, model_dir)
    (model_dir / "chat_template.jinja").write_text(STRICT_TEMPLATE)
    turns = [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "again"}]
    dataset = write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns}])
    with pytest.raises(InvalidDataset, match="line 1: .*roles must alternate") as caught:
        finetune.run(make_ctx(tmp_path, model_dir, dataset))
    assert caught.value.retryable is False


def test_chat_dataset_with_gradient_checkpointing(tmp_path: Path, tiny_qwen2: Path) -> None:
    records = [
        {
            "messages": [
                {"role": "system", "content": "Answer with a color."},
                {"role": "user", "content": f"Item {i}?"},
                {"role": "assistant", "content": color},
            ]
        }
        for i, color in enumerate(COLORS)
    ]
    ctx = make_ctx(
        tmp_path,
        tiny_qwen2,
        write_jsonl(tmp_path / "chat.jsonl", records),
        dataset_format="chat",
        training={"max_steps": 30, "use_gradient_checkpointing": True, "batch_size": 8},
    )
    finetune.run(ctx)
    losses = train_losses(ctx)
    assert losses[-1] <= losses[0] / 2, losses


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_lora_on_cuda(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), training={"bf16": True})
    ctx.device = "cuda"
    result = finetune.run(ctx)
    cfg = finetune.resolve_config(ctx)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert (cfg.use_bf16, cfg.use_fp16) == (native, not native)
    losses = train_losses(ctx)
    assert losses[-1] <= losses[0] / 2, losses
    assert result["adapter"] is not None
    assert all(m["vram_gb"] > 0 for m in ctx.metrics if m["phase"] == "train")


def _bitsandbytes_importable() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and _bitsandbytes_importable()), reason="needs CUDA and bitsandbytes"
)
def test_qlora_on_cuda(tmp_path: Path, tiny_llama: Path) -> None:
    ctx = make_ctx(
        tmp_path, tiny_llama, memorization_set(tmp_path), method="qlora", training={"max_steps": 60}
    )
    ctx.device = "cuda"
    result = finetune.run(ctx)
    losses = train_losses(ctx)
    assert losses[-1] < losses[0], losses
    assert "adapter_model.safetensors" in ctx.outputs and result["params_trainable"] > 0


def test_warmup_never_runs_a_step_at_lr_0_and_logs_the_rate_each_step_used(
    tmp_path: Path, tiny_llama: Path
) -> None:
    peak = 1e-2
    training = {"max_steps": 6, "warmup_steps": 2, "lr_scheduler": "linear", "logging_steps": 1}
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), training=training)
    finetune.run(ctx)
    logged = [m["lr"] for m in ctx.metrics if m["phase"] == "train"]
    # Warmup 1/2, 2/2 of the peak; then linear decay over the 4 remaining steps, the last one still > 0.
    assert logged == pytest.approx([peak / 2, peak, peak, peak * 3 / 4, peak / 2, peak / 4])

    # One step inside a 2-step warmup moves the adapter (at lr 0 it stayed at its zero B matrices).
    one = make_ctx(
        tmp_path, tiny_llama, memorization_set(tmp_path), "one", training={"max_steps": 1, "warmup_steps": 2}
    )
    finetune.run(one)
    adapter = final_adapter(one)
    assert any(float(t.abs().max()) > 0 for name, t in adapter.items() if "lora_B" in name)


def test_the_result_says_which_split_perplexity_was_measured_on(tmp_path: Path, tiny_llama: Path) -> None:
    dataset = memorization_set(tmp_path)
    on_train = finetune.run(make_ctx(tmp_path, tiny_llama, dataset, "t", training={"max_steps": 2}))
    assert on_train["ppl_split"] == "train"
    held_out = finetune.run(
        make_ctx(tmp_path, tiny_llama, dataset, "e", training={"max_steps": 2, "eval_split": 0.25})
    )
    assert held_out["ppl_split"] == "eval"


def test_gpus_without_native_bf16_train_in_fp16_with_loss_scaling(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path))
    ctx.device = "cuda"
    # A T4 or V100: torch "supports" bf16 there only by emulation, which is slow.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    cfg = finetune.resolve_config(ctx)
    assert (cfg.use_bf16, cfg.use_fp16) == (False, True)
    # An A100 or newer computes bf16 natively.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    cfg = finetune.resolve_config(ctx)
    assert (cfg.use_bf16, cfg.use_fp16) == (True, False)
    ctx.spec["training"]["bf16"] = False  # asked for fp32
    cfg = finetune.resolve_config(ctx)
    assert (cfg.use_bf16, cfg.use_fp16) == (False, False)


def test_models_load_in_16_bit_on_cuda_and_fp32_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunery_worker.modeling import load_dtype

    assert load_dtype("cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert load_dtype("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert load_dtype("cuda:1") == torch.float16  # bf16 only emulated: fp16


def test_lora_dropout_0_reaches_peft_so_no_dropout_copies_are_made(tmp_path: Path, tiny_llama: Path) -> None:
    # The public API's `lora_dropout: 0` (and the protocol's `dropout: 0`) must arrive as 0, not be
    # dropped for the default 0.05: peft then puts Identity where a Dropout would copy every input.
    ctx = make_ctx(tmp_path, tiny_llama, memorization_set(tmp_path), lora={"r": 4, "lora_dropout": 0})
    job = finetune.Finetune(ctx, finetune.resolve_config(ctx))
    job.setup()
    dropouts = [m for name, m in job.model.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, torch.nn.Identity) for m in dropouts)
    job.cleanup()
