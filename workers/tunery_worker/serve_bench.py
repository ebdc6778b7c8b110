"""Chat completions from the serving backend called in-process: the floor under what Tunery serves.

    python -m tunery_worker.serve_bench --model DIR [--requests N] [--max-tokens M] [--json]

Loads `DIR` the way `tunery-worker run --serve` does (transformers, CPU or CUDA) and runs the same
`serve.generate` a serving worker runs for each request, with no server and no queue in between:
greedy, one request at a time, after a warm-up. Reported per request: time to first text (the
first text `generate` hands to its reporter, as the worker would send it) and completion tokens per
second over the whole request. `pnpm bench` (section 6) puts the medians beside the same requests
made through Tunery (`/openai/v1/chat/completions`, streamed, to a `--serve` worker): the
difference is what the queue path costs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from tunery_worker.modeling import load_dtype, load_model_and_tokenizer
from tunery_worker.serve import Loaded, generate

#: The request of every run; the bench sends Tunery the same one.
MESSAGES = [{"role": "user", "content": "Once upon a time"}]


def one_request(loaded: Loaded, max_tokens: int) -> dict[str, float]:
    request: dict[str, Any] = {
        "input": {"kind": "chat", "messages": MESSAGES},
        "params": {"max_tokens": max_tokens, "temperature": 0, "top_p": 1, "stop": [], "seed": None},
    }
    first: list[float] = []
    started = time.perf_counter()

    def send(text: str, final: bool) -> None:
        if text and not first:
            first.append(time.perf_counter())

    outcome = generate(loaded, None, request, send)
    outcome["follow"].flush(final=True)
    elapsed = time.perf_counter() - started
    tokens = outcome["usage"]["completion_tokens"]
    return {
        "ttft_ms": 1000 * ((first[0] if first else time.perf_counter()) - started),
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
        "completion_tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    summary = __doc__.split("\n")[0]
    p = argparse.ArgumentParser(prog="python -m tunery_worker.serve_bench", description=summary)
    p.add_argument("--model", required=True, help="model directory (e.g. from tunery-worker make-tiny-model)")
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print one JSON line instead of text")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tokenizer = load_model_and_tokenizer(args.model, device=device, dtype=load_dtype(device))
    model.eval()
    loaded = Loaded(model, tokenizer)
    for _ in range(args.warmup):
        one_request(loaded, args.max_tokens)
    runs = [one_request(loaded, args.max_tokens) for _ in range(args.requests)]
    report = {
        "device": device,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "ttft_ms_p50": statistics.median(r["ttft_ms"] for r in runs),
        "tokens_per_s_p50": statistics.median(r["tokens_per_s"] for r in runs),
        "completion_tokens_p50": statistics.median(r["completion_tokens"] for r in runs),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
