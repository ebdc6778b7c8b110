"""Training throughput of the worker's LoRA loop, next to a plain transformers + peft loop.

    python -m tunery_worker.bench [--steps N] [--json]          # CPU: the tiny model, both loops
    python -m tunery_worker.bench --cuda --size 1b [--json]     # GPU: ~1.5B Llama vs the HF baseline
    python -m tunery_worker.bench --loss-memory [--json]        # CPU: peak RSS, plain vs fused loss

CPU (the default): a tiny random Llama from `make_tiny_model`, batch 8 x 256 tokens of synthetic text.
  - `tunery`: the finetune handler (`jobs.finetune.run`) with a `LocalJobContext`, a metric point every
    step; its per-step tokens/s are the `throughput` of those points.
  - `peer`: the same model, LoRA config, batches and AdamW in the plain loop everyone writes
    (forward with labels, backward, step), timed per step the same way.
  The two alternate step by step in one process (the handler checks for a stop once a step; the
  context runs one peer step there), so a change in the machine's load hits both alike. The first
  steps are warm-up and left out; reported are the median per-step tokens/s, the process's peak RSS
  and tunery/peer. On a shared machine the wall-clock medians swing with other processes' load, so
  two load-robust ratios come beside it: `paired_ratio`, the median over steps of peer time / tunery
  time for each tunery step and the peer step run just before it, and `cpu_ratio`, the same on the
  thread's CPU time (what each step computed, whatever else ran; one torch thread runs in this one).

GPU (`--cuda --size 1b`): the tunery loop, in a process of its own, on the random-init Llama ~1.5B of
`workers/bench/hf_peft_baseline.py` (batch 8 x 2048, bf16 autocast, LoRA r16 / alpha 32 on the seven
projections), then that baseline script itself until it prints its 1b LoRA line: the same card in the
same run, as the baseline asks.

Loss memory (`--loss-memory`): one LoRA step (forward, backward, AdamW) of a random Llama with a
128k vocabulary (Llama-3's 128256, hidden 256, 2 layers) on one sequence of 2048 tokens, on CPU, in
a process of its own per loss: `plain` (the model's full logits, then cross-entropy: what the loss
was before) and `fused` (`causal_lm_loss_sum`). Reported: each process's peak RSS, its RSS before
the step, and the loss (the same to float rounding).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunery_worker.context import LocalJobContext
from tunery_worker.jobs.model_source import MODEL_ROOTS_ENV

LORA: dict[str, Any] = {
    "r": 16,
    "alpha": 32,
    "dropout": 0.0,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "bias": "none",
}
LEARNING_RATE = 1e-4
# The 1b shape of hf_peft_baseline.py (Llama-3-like, ~1.5B parameters with its 128k vocabulary).
LLAMA_1B: dict[str, Any] = dict(
    vocab_size=128256,
    max_position_embeddings=4096,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
)
BASELINE = Path(__file__).resolve().parents[1] / "bench" / "hf_peft_baseline.py"
# Matmul FLOPs per token for LoRA (forward 2N, activation grads 2N) and the peak the baseline divides by.
LORA_FLOP_MULT, PEAK_FLOPS = 4, 989e12


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tunery_worker.bench", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, help="optimizer steps per loop (default 32 on CPU, 16 on GPU)")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of the median (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, help="tokens per example (default 256 on CPU, 2048 on GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see bench_cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    p.add_argument("--cuda", action="store_true", help="GPU: the tunery loop vs hf_peft_baseline.py")
    p.add_argument("--size", choices=["tiny", "1b"], help="model (tiny on CPU, 1b with --cuda)")
    p.add_argument("--loss-memory", action="store_true", help="CPU: peak RSS of a 128k-vocab LoRA step")
    p.add_argument("--loss-variant", choices=["plain", "fused"], help=argparse.SUPPRESS)
    p.add_argument("--baseline", type=Path, default=BASELINE, help=argparse.SUPPRESS)
    # Internal (GPU mode): run the tunery loop alone in this process and print its JSON.
    p.add_argument("--tunery-only", nargs=2, type=Path, metavar=("MODEL", "DATA"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.loss_variant:
        print(json.dumps(loss_step_memory(args.loss_variant, args.seq_len or 2048)), flush=True)
        return 0
    if args.loss_memory:
        report = bench_loss_memory(args.seq_len or 2048, args.threads)
        print(json.dumps(report) if args.json else describe_loss_memory(report), flush=True)
        return 0
    if args.cuda != ((args.size or ("1b" if args.cuda else "tiny")) == "1b"):
        p.error("--cuda goes with --size 1b (and the tiny model runs on CPU)")
    args.steps = args.steps or (16 if args.cuda else 32)
    if args.steps <= args.warmup:
        p.error(f"--steps must be more than the {args.warmup} warm-up steps")
    seq_len = args.seq_len or (2048 if args.cuda else 256)
    shape = Shape(args.steps, args.warmup, args.batch_size, seq_len)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would clutter stderr
    if args.tunery_only:
        model_dir, data = args.tunery_only
        print(json.dumps(run_tunery(model_dir, data, "cuda", shape)), flush=True)
        return 0
    if args.cuda:
        import torch

        if not torch.cuda.is_available():
            print(
                f"--cuda needs a CUDA GPU, and this machine has none (torch {torch.__version__}). "
                "Run `python -m tunery_worker.bench` without --cuda for the CPU benchmark, or run this "
                "on a GPU machine with a CUDA build of torch.",
                file=sys.stderr,
            )
            return 2
    report = bench_gpu(args.baseline, shape) if args.cuda else bench_cpu(shape, args.threads)
    print(json.dumps(report) if args.json else describe(report), flush=True)
    return 0


@dataclass(frozen=True)
class Shape:
    steps: int
    warmup: int  # first steps left out of the median
    batch_size: int
    seq_len: int


# --- the two modes -----------------------------------------------------------------------------------------


def bench_cpu(shape: Shape, threads: int) -> dict[str, Any]:
    import torch

    from tunery_worker.tiny_model import make_tiny_model

    # One thread by default: the tiny model gains little from more, and on a busy machine the spin-waits
    # of several threads make the figures erratic (the test suite runs single-threaded for the same reason).
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="tunery-bench-") as tmp:
        model_dir = make_tiny_model(Path(tmp) / "model", max_positions=max(512, shape.seq_len))
        data = write_dataset(Path(tmp) / "dataset.jsonl", model_dir, shape)
        peer = PeerLoop(model_dir, data, "cpu", shape)
        tunery = run_tunery(model_dir, data, "cpu", shape, peer=peer)
    return {
        "device": "cpu",
        "threads": threads,
        "model": "tiny llama (make_tiny_model defaults)",
        "params": tunery["params"],
        **vars(shape),
        "lora": LORA,
        "tunery": tunery,
        "peer": peer.figures(),
        "ratio": round(tunery["tokens_per_s"] / peer.figures()["tokens_per_s"], 3),
        **paired_ratios(tunery.pop("step_wall_s"), tunery.pop("step_cpu_s"), peer, shape.warmup),
        # Both loops share the process, so this is their peak together.
        **memory("cpu"),
    }


def bench_gpu(baseline: Path, shape: Shape) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory(prefix="tunery-bench-") as tmp:
        model_dir = write_llama_1b(Path(tmp) / "model")
        data = write_dataset(Path(tmp) / "dataset.jsonl", model_dir, shape)
        # Alone in its own process, so the baseline below finds the GPU empty.
        cmd = [sys.executable, "-m", "tunery_worker.bench", "--cuda", "--size", "1b"]
        cmd += ["--steps", str(shape.steps), "--warmup", str(shape.warmup)]
        cmd += ["--batch-size", str(shape.batch_size), "--seq-len", str(shape.seq_len)]
        done = subprocess.run(
            [*cmd, "--tunery-only", str(model_dir), str(data)], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"the tunery loop failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        tunery = json.loads(done.stdout.strip().splitlines()[-1])
    peer = run_baseline(baseline)
    # The baseline's MFU formula, applied to our loop (same shape, so the same FLOPs per token).
    attention = 12 * LLAMA_1B["num_hidden_layers"] * LLAMA_1B["hidden_size"] * shape.seq_len
    flops = LORA_FLOP_MULT * tunery["params"] + attention
    tunery["mfu_vs_989"] = round(tunery["tokens_per_s"] * flops / PEAK_FLOPS, 3)
    return {
        "device": torch.cuda.get_device_name(0),
        "model": "random-init llama 1b (hf_peft_baseline.py shape)",
        "params": tunery["params"],
        **vars(shape),
        "lora": LORA,
        "tunery": tunery,
        "peer": peer,
        "ratio": round(tunery["tokens_per_s"] / peer["tokens_per_s"], 3),
    }


# --- loss memory: a 128k-vocabulary LoRA step, plain vs fused loss ----------------------------------------

LOSS_MEMORY_MODEL: dict[str, Any] = dict(
    vocab_size=128256,  # Llama-3's vocabulary: the logits, not the layers, are what this measures
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def bench_loss_memory(seq_len: int, threads: int) -> dict[str, Any]:
    """Each loss in a fresh process, so each peak RSS is that loss's alone."""
    runs = {}
    for variant in ("plain", "fused"):
        cmd = [sys.executable, "-m", "tunery_worker.bench", "--loss-variant", variant]
        cmd += ["--seq-len", str(seq_len), "--threads", str(threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(
                f"the {variant} loss step failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
            )
        runs[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "device": "cpu",
        "model": f"random llama, vocab {LOSS_MEMORY_MODEL['vocab_size']}, "
        f"hidden {LOSS_MEMORY_MODEL['hidden_size']}, {LOSS_MEMORY_MODEL['num_hidden_layers']} layers",
        "seq_len": seq_len,
        "batch_size": 1,
        "lora": LORA,
        **runs,
        "peak_rss_saved_mb": round(runs["plain"]["peak_rss_mb"] - runs["fused"]["peak_rss_mb"], 1),
    }


def loss_step_memory(variant: str, seq_len: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunery_worker.modeling import causal_lm_loss_sum, token_loss_sum

    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(LlamaConfig(**LOSS_MEMORY_MODEL)),
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        ),
    )
    model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    input_ids = torch.randint(0, LOSS_MEMORY_MODEL["vocab_size"], (1, seq_len))
    rss_before = memory("cpu")["peak_rss_mb"]
    started = time.perf_counter()
    if variant == "plain":
        loss_sum, count = token_loss_sum(model(input_ids=input_ids).logits, input_ids)
    else:
        loss_sum, count = causal_lm_loss_sum(model, input_ids, input_ids)
    (loss_sum / count).backward()
    optimizer.step()
    return {
        "rss_before_step_mb": rss_before,
        "peak_rss_mb": memory("cpu")["peak_rss_mb"],
        "step_s": round(time.perf_counter() - started, 2),
        "loss": round(float(loss_sum.detach()) / count, 5),
    }


def describe_loss_memory(report: dict[str, Any]) -> str:
    plain, fused = report["plain"], report["fused"]
    return "\n".join(
        [
            f"one LoRA step, {report['model']}, 1 x {report['seq_len']} tokens on CPU:",
            f"  plain loss (full fp32 logits): peak RSS {plain['peak_rss_mb']:,.0f} MB "
            f"(before the step {plain['rss_before_step_mb']:,.0f} MB), loss {plain['loss']}",
            f"  fused chunked loss:            peak RSS {fused['peak_rss_mb']:,.0f} MB "
            f"(before the step {fused['rss_before_step_mb']:,.0f} MB), loss {fused['loss']}",
            f"  saved: {report['peak_rss_saved_mb']:,.0f} MB",
        ]
    )


# --- inputs: synthetic text, and the 1b model ---------------------------------------------------------


def write_dataset(path: Path, model_dir: Path, shape: Shape) -> Path:
    """One text per example of the run, each longer than `seq_len` tokens, so every example is full."""
    from tunery_worker.modeling import load_tokenizer
    from tunery_worker.tiny_model import _CORPUS

    tokenizer = load_tokenizer(model_dir)
    words = " ".join(_CORPUS).split()
    rng = random.Random(0)
    n_words = shape.seq_len * 3 // 4  # the tiny BPE gives ~2.5 tokens a word; checked below
    texts = [
        " ".join(rng.choice(words) for _ in range(n_words)) for _ in range(shape.steps * shape.batch_size)
    ]
    shortest = min(len(tokenizer(t)["input_ids"]) for t in texts)
    if shortest <= shape.seq_len:
        raise RuntimeError(f"synthetic text too short: {shortest} tokens for seq_len {shape.seq_len}")
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def write_llama_1b(out: Path) -> Path:
    """The baseline's random-init 1b Llama (bf16), saved with a tiny tokenizer, for the handler to load."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunery_worker.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **LLAMA_1B,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    # (Called through nn.Module: transformers' decorated `.to` confuses type checkers.)
    torch.nn.Module.to(model, torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    return out


# --- the loops --------------------------------------------------------------------------------------------


class PeerLoop:
    """A plain transformers + peft loop: the same model, LoRA config, batches and AdamW, nothing else."""

    def __init__(self, model_dir: Path, data: Path, device: str, shape: Shape) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device, self.shape = device, shape
        torch.manual_seed(42)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.nn.Module.to(base, torch.device(device))
        self.params = sum(p.numel() for p in base.parameters())
        lora = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        )
        self.model = get_peft_model(base, lora)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE)
        texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
        self.input_ids = tokenizer(texts, truncation=True, max_length=shape.seq_len, return_tensors="pt")[
            "input_ids"
        ]
        self.tokens_per_s: list[float] = []
        self.wall_s: list[float] = []
        self.cpu_s: list[float] = []
        self.losses: list[float] = []

    def step(self) -> None:
        import torch

        n, size = len(self.tokens_per_s), self.shape.batch_size
        started, started_cpu = time.perf_counter(), time.thread_time()
        batch = self.input_ids[n * size : (n + 1) * size].to(self.device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.device == "cuda"):
            loss = self.model(input_ids=batch, labels=batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(float(loss.detach()))  # (waits for the device, as the handler's loss does)
        self.wall_s.append(time.perf_counter() - started)
        self.cpu_s.append(time.thread_time() - started_cpu)
        self.tokens_per_s.append(batch.numel() / self.wall_s[-1])

    def figures(self) -> dict[str, Any]:
        if len(self.tokens_per_s) != self.shape.steps:
            raise RuntimeError(f"the peer ran {len(self.tokens_per_s)} steps, not {self.shape.steps}")
        return {
            "tokens_per_s": round(statistics.median(self.tokens_per_s[self.shape.warmup :]), 1),
            "tokens_per_step": self.shape.batch_size * self.shape.seq_len,
            "params": self.params,
            "loss_first": round(self.losses[0], 6),
            "loss_last": round(self.losses[-1], 6),
        }


@dataclass
class BenchContext(LocalJobContext):
    """A LocalJobContext whose once-a-step stop check first runs one step of the peer loop, if any."""

    peer: PeerLoop | None = None
    # The thread's CPU clock at each stop check, before and after the peer step: a tunery step's CPU
    # time runs from one check's end to the next check's start.
    cpu_at_check: list[tuple[float, float]] = field(default_factory=list)

    def should_stop(self) -> bool:
        if self.peer is not None:
            before = time.thread_time()
            self.peer.step()
            self.cpu_at_check.append((before, time.thread_time()))
        return super().should_stop()


@contextlib.contextmanager
def allowed_model_root(folder: Path) -> Iterator[None]:
    """Lets the worker load models from `folder` while the block runs.

    The worker loads local models only from the operator's model folders (TUNERY_MODEL_ROOTS); the
    bench writes its model to a temp folder of its own, so it adds that folder to them.
    """
    before = os.environ.get(MODEL_ROOTS_ENV)
    os.environ[MODEL_ROOTS_ENV] = ":".join(filter(None, [os.path.realpath(folder), before]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MODEL_ROOTS_ENV, None)
        else:
            os.environ[MODEL_ROOTS_ENV] = before


def run_tunery(
    model_dir: Path, data: Path, device: str, shape: Shape, peer: PeerLoop | None = None
) -> dict[str, Any]:
    """The worker's finetune handler, as the runner calls it, with every step reported."""
    from tunery_worker.jobs import finetune

    spec = {
        "method": "lora",
        "base_model": {"name": model_dir.name, "source": str(model_dir)},
        "lora": LORA,
        "training": {
            "max_steps": shape.steps,
            "batch_size": shape.batch_size,
            "learning_rate": LEARNING_RATE,
            "lr_scheduler": "constant",
            "max_seq_length": shape.seq_len,
            "logging_steps": 1,
            "save_steps": shape.steps + 1,  # no checkpoint inside the measured steps
            "bf16": device == "cuda",
        },
        "dataset_format": "text",
        "output_name": "bench",
    }
    with tempfile.TemporaryDirectory(prefix="tunery-bench-job-") as workdir, allowed_model_root(model_dir):
        ctx = BenchContext(
            job_id="job_bench",
            job_type="finetune",
            spec=spec,
            workdir=Path(workdir),
            device=device,
            inputs={"dataset": data},
            peer=peer,
        )
        started = time.perf_counter()
        result = finetune.run(ctx)
        wall = time.perf_counter() - started
    points = sorted((m for m in ctx.metrics if m["phase"] == "train"), key=lambda m: m["step"])
    if len(points) != shape.steps:
        raise RuntimeError(f"expected a metric point per step, got {len(points)} for {shape.steps} steps")
    tokens_per_step = (points[-1]["tokens"] - points[0]["tokens"]) // (shape.steps - 1)
    if tokens_per_step != shape.batch_size * shape.seq_len:
        raise RuntimeError(
            f"steps of {tokens_per_step} tokens, expected {shape.batch_size} x {shape.seq_len}"
        )
    figures = {
        "tokens_per_s": round(statistics.median(m["throughput"] for m in points[shape.warmup :]), 1),
        "tokens_per_step": tokens_per_step,
        "params": result["params_before"],
        "params_trainable": result["params_trainable"],
        "loss_first": points[0]["loss"],
        "loss_last": points[-1]["loss"],
        # Everything the handler does: load, baseline perplexity, train, final eval, save.
        "handler_wall_s": round(wall, 2),
    }
    if peer is None:
        return {**figures, **memory(device)}
    checks = ctx.cpu_at_check
    figures["step_wall_s"] = [tokens_per_step / m["throughput"] for m in points]
    figures["step_cpu_s"] = [checks[i + 1][0] - checks[i][1] for i in range(len(checks) - 1)]
    return figures


def paired_ratios(
    tunery_wall: list[float], tunery_cpu: list[float], peer: PeerLoop, warmup: int
) -> dict[str, float]:
    """Median over steps of peer time / tunery time, each tunery step paired with the peer step just
    before it: on wall-clock time (`paired_ratio`) and on the thread's CPU time (`cpu_ratio`)."""
    wall = [p / t for p, t in zip(peer.wall_s[warmup:], tunery_wall[warmup:], strict=False)]
    cpu = [p / t for p, t in zip(peer.cpu_s[warmup:], tunery_cpu[warmup:], strict=False)]
    return {
        "paired_ratio": round(statistics.median(wall), 3),
        "cpu_ratio": round(statistics.median(cpu), 3),
    }


def run_baseline(script: Path) -> dict[str, Any]:
    """Runs hf_peft_baseline.py until it prints its 1b LoRA line (its later configs are not needed)."""
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    seen: list[str] = []
    try:
        for line in proc.stdout:
            seen.append(line.rstrip())
            if line.startswith("{"):
                row = json.loads(line)
                if row.get("size") == "1b" and row.get("mode") == "lora":
                    return {**row, "script": str(script), "versions": seen[:2]}
            if line.startswith("ERR"):
                break
    finally:
        proc.kill()
        proc.wait()
    raise RuntimeError("hf_peft_baseline.py gave no 1b LoRA line:\n" + "\n".join(seen[-20:]))


def memory(device: str) -> dict[str, float]:
    # ru_maxrss is the process's peak resident set, in KiB on Linux.
    out = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if device == "cuda":
        import torch

        out["peak_vram_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return out


def describe(report: dict[str, Any]) -> str:
    t, p = report["tunery"], report["peer"]
    peer_name = "hf_peft_baseline.py" if "script" in p else "plain transformers+peft"
    memory_line = (
        f"  peak RSS of both loops: {report['peak_rss_mb']} MB"
        if "peak_rss_mb" in report
        else f"  peak VRAM: tunery {t.get('peak_vram_gib')} GiB, baseline {p.get('peak_gib')} GiB"
    )
    return "\n".join(
        [
            f"{report['model']} on {report['device']}: {report['params']:,} params, "
            f"batch {report['batch_size']} x {report['seq_len']}, {report['steps']} steps "
            f"({report['warmup']} warm-up)",
            f"  tunery loop: {t['tokens_per_s']:,.0f} tok/s (step median)",
            f"  {peer_name}: {p['tokens_per_s']:,.0f} tok/s",
            f"  tunery / peer: {report['ratio']} (paired steps: {report.get('paired_ratio')}, "
            f"CPU time: {report.get('cpu_ratio')})",
            memory_line,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
