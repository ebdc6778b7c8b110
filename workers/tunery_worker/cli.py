"""`tunery-worker`: run a worker against a Tunery server, or build a tiny local model.

    tunery-worker [run] --server URL --token T [--device auto|cuda|cpu] [--concurrency N]
                        [--worker-id ID] [--workdir DIR] [--once] [--wait-seconds S]
                        [--shutdown-grace S]
                        [--serve [--serve-backend transformers|vllm|auto] [--vllm-max-loras N]
                                 [--vllm-args ARGS]]
    tunery-worker make-tiny-model DIR [--arch llama|qwen2] [--seed N]

`run` is the default subcommand, so `tunery-worker --server …` works too. The server URL and token
also come from TUNERY_SERVER_URL and TUNERY_WORKER_TOKEN. SIGTERM (or a first Ctrl-C) shuts down
gracefully: running jobs checkpoint and are handed back to the queue, talking to the server for at
most `--shutdown-grace` seconds more (an unreachable server is not waited out); a second SIGTERM or
Ctrl-C exits at once.

`--serve` answers inference requests instead of running jobs, with the backend `--serve-backend`
names: `transformers` (models in the worker's process), `vllm` (vLLM's OpenAI server as a child
process per base model, adapters loaded at runtime; needs `pip install 'tunery-worker[vllm]'` and
CUDA), or `auto` (the default: vllm when `import vllm` works and CUDA is available, else
transformers).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunery_worker import __version__

SUBCOMMANDS = {"run", "make-tiny-model"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tunery-worker", description="Tunery's PyTorch training worker.")
    parser.add_argument("--version", action="version", version=f"tunery-worker {__version__}")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="claim and run jobs from a Tunery server (the default)")
    run.add_argument(
        "--server", default=os.environ.get("TUNERY_SERVER_URL"), help="server URL ($TUNERY_SERVER_URL)"
    )
    run.add_argument(
        "--token", default=os.environ.get("TUNERY_WORKER_TOKEN"), help="worker token ($TUNERY_WORKER_TOKEN)"
    )
    run.add_argument("--device", default="auto", help="auto (CUDA when available), cuda, cuda:N or cpu")
    run.add_argument(
        "--concurrency",
        "--max-jobs",
        type=int,
        default=1,
        dest="concurrency",
        help="jobs run at once (default 1); with --serve on vllm, requests answered at once",
    )
    run.add_argument("--worker-id", help="stable name of this worker (default: host name + random suffix)")
    run.add_argument("--workdir", type=Path, default=Path("./tunery-work"), help="scratch space for attempts")
    run.add_argument("--once", action="store_true", help="run at most one job per slot, then exit")
    run.add_argument(
        "--wait-seconds", type=float, default=20.0, help="claim long-poll time, 0-30 (default 20)"
    )
    run.add_argument(
        "--shutdown-grace",
        type=float,
        default=30.0,
        help="after SIGTERM, stop retrying requests to the server after this many seconds (default 30)",
    )
    run.add_argument("--keep-workdir", action="store_true", help="keep each attempt's files after it ends")
    run.add_argument(
        "--gang-addr",
        default=os.environ.get("TUNERY_GANG_ADDR"),
        help="join multi-node jobs (num_nodes > 1), hosting their rendezvous on this address, which the "
        "other workers must reach ($TUNERY_GANG_ADDR; default: do not join them)",
    )
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ...")
    run.add_argument(
        "--serve",
        action="store_true",
        help="answer inference requests (chat/completions) instead of running jobs",
    )
    run.add_argument(
        "--serve-backend",
        choices=["transformers", "vllm", "auto"],
        default="auto",
        help="with --serve: what generates. transformers: models in this process; vllm: vLLM's OpenAI "
        "server as a child process per base model, LoRA adapters loaded at runtime (the vllm extra, "
        "CUDA only); auto (default): vllm when `import vllm` works and CUDA is available, else "
        "transformers",
    )
    run.add_argument(
        "--vllm-max-loras",
        type=int,
        default=4,
        help="with --serve-backend vllm: adapters one vLLM batch can mix (its --max-loras; default 4)",
    )
    run.add_argument(
        "--vllm-args",
        default="",
        help="with --serve-backend vllm: more arguments for each vLLM server, as one string, e.g. "
        "--vllm-args='--gpu-memory-utilization 0.45' to fit two base models; they win over the "
        "worker's own (--vllm-args='--max-lora-rank 128' for adapters above rank 64)",
    )

    tiny = sub.add_parser(
        "make-tiny-model", help="write a tiny random-weight model + tokenizer (no download)"
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--layers", type=int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (
        args_list[0] not in SUBCOMMANDS and args_list[0] not in ("-h", "--help", "--version")
    ):
        args_list.insert(0, "run")
    parser = build_parser()
    args = parser.parse_args(args_list)
    if args.command == "make-tiny-model":
        return make_tiny_model(args)
    return run_worker(args, parser)


def make_tiny_model(args: argparse.Namespace) -> int:
    from tunery_worker.tiny_model import make_tiny_model as make

    out = make(args.dir, arch=args.arch, seed=args.seed, hidden=args.hidden, layers=args.layers)
    print(out)
    return 0


def run_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if not args.server or not args.token:
        parser.error("--server and --token are required (or TUNERY_SERVER_URL and TUNERY_WORKER_TOKEN)")
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    if not 0 <= args.wait_seconds <= 30:
        parser.error("--wait-seconds must be between 0 and 30")
    if args.shutdown_grace < 0:
        parser.error("--shutdown-grace must be at least 0")
    if args.vllm_max_loras < 1:
        parser.error("--vllm-max-loras must be at least 1")
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # Imported here so `--help` and `make-tiny-model` do not pay for torch's import in the worker path.
    from tunery_worker.client import WorkerClient
    from tunery_worker.modeling import resolve_device
    from tunery_worker.runner import Worker

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(str(err))
    client = WorkerClient(args.server, args.token)
    options: dict[str, Any] = {"worker_id": args.worker_id} if args.worker_id else {}
    if args.serve:
        return serve(args, parser, client, device)
    worker = Worker(
        client,
        device=device,
        workdir=args.workdir,
        concurrency=args.concurrency,
        once=args.once,
        wait_seconds=args.wait_seconds,
        keep_workdir=args.keep_workdir,
        shutdown_grace=args.shutdown_grace,
        gang_addr=args.gang_addr or None,
        **options,
    )
    return run_until_done(worker, client)


def run_until_done(worker: Any, client: Any) -> int:
    """Runs `worker` with the shutdown signals handled, then closes the client."""
    previous = install_signal_handlers(worker)
    try:
        return int(worker.run())
    finally:
        client.close()
        # Put back what was there: main() may run inside a longer-lived process (tests, embedding).
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def serve(args: argparse.Namespace, parser: argparse.ArgumentParser, client: Any, device: str) -> int:
    import platform
    import shlex
    import uuid

    from tunery_worker.serve import ServingWorker
    from tunery_worker.serve_vllm import choose_backend, make_backend

    backend_name, why_not_vllm = choose_backend(args.serve_backend, device)
    if args.serve_backend == "vllm" and why_not_vllm:
        client.close()
        parser.error(f"--serve-backend vllm: {why_not_vllm}")
    if args.serve_backend == "auto" and why_not_vllm:
        logging.getLogger("tunery_worker").info("serving with transformers: %s", why_not_vllm)
    backend = make_backend(
        backend_name,
        client,
        device,
        args.workdir,
        max_loras=args.vllm_max_loras,
        vllm_args=shlex.split(args.vllm_args),
    )
    # The claim carries no capabilities: the default worker id names the backend, so that the
    # server's serving workers (and its logs) show what each one serves with.
    default_id = f"{platform.node() or 'worker'}-serve-{backend.name}-{uuid.uuid4().hex[:8]}"
    worker = ServingWorker(
        client,
        worker_id=args.worker_id or default_id,
        device=device,
        workdir=args.workdir,
        wait_seconds=args.wait_seconds,
        once=args.once,
        backend=backend,
        concurrency=args.concurrency,
    )
    return run_until_done(worker, client)


def install_signal_handlers(worker: Any) -> dict[int, Any]:
    """SIGTERM and a first Ctrl-C shut down gracefully; a second of either exits at once. Returns the
    handlers they replaced."""

    def on_signal(signum: int, _frame: Any) -> None:
        if worker.shutdown_requested:
            # "Now": the jobs' leases expire on the server, which requeues them. os._exit, not
            # SystemExit: an interpreter shutdown with job threads still writing can abort or hang.
            logging.getLogger("tunery_worker").warning("second signal: exiting now")
            sys.stderr.flush()
            os._exit(128 + signum)
        worker.request_shutdown()

    previous: dict[int, Any] = {
        signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)
    }
    for signum in previous:
        signal.signal(signum, on_signal)
    return previous


if __name__ == "__main__":
    sys.exit(main())
