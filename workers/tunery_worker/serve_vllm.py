"""The vLLM serving backend (`tunery-worker run --serve --serve-backend vllm|auto`), on a CUDA worker.

Each base model (or full model's files) runs in its own vLLM OpenAI-compatible server, a child
process started on first use and kept until the worker stops:

    python -m vllm.entrypoints.openai.api_server --model <source> --enable-lora --max-loras N
        --max-lora-rank R --host 127.0.0.1 --port <free port> [--vllm-args …]

with `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`, so adapters load at runtime (`POST
/v1/load_lora_adapter {lora_name, lora_path}`, once per adapter) and drop (`POST
/v1/unload_lora_adapter {lora_name}`). A request streams from `/v1/chat/completions` (chat input on a
model with a chat template: vLLM applies it) or `/v1/completions` (a prompt, or chat messages as
"role: content" lines for a model without one, as the transformers backend writes them), with
temperature, top_p, max_tokens, stop and seed passed through; text chunks are relayed (at most every
REPORT_INTERVAL), then finish_reason and usage. A caller that leaves closes the HTTP stream, which
aborts the request in vLLM.

vLLM itself is imported only to decide whether this backend can run (`vllm_unavailable`); the server
runs in its own process. The launcher is injectable: tests point the backend at a fake server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tunery_worker.client import WorkerClient
from tunery_worker.errors import InvalidConfig
from tunery_worker.jobs.model_source import checked_source
from tunery_worker.serve import (
    REPORT_INTERVAL,
    Backend,
    Send,
    TransformersBackend,
    download_files,
    plain_chat_prompt,
)

log = logging.getLogger(__name__)

BACKENDS = ("transformers", "vllm", "auto")


def vllm_unavailable(device: str) -> str | None:
    """Why the vLLM backend cannot run on `device` here, or None when it can (vllm imports and CUDA
    is available)."""
    if not device.startswith("cuda"):
        return f"the worker's device is {device}, and vLLM needs CUDA"
    try:
        import vllm  # noqa: F401
    except Exception as err:  # ImportError, or a vllm built for another torch/CUDA
        return f"the vllm package does not import ({type(err).__name__}: {err})"
    import torch

    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def choose_backend(choice: str, device: str) -> tuple[str, str | None]:
    """The backend to serve with for `--serve-backend choice`, and why vLLM is not it (None when it
    is, or was not asked for). `auto` is vllm when vllm imports and CUDA is available."""
    if choice not in BACKENDS:
        raise ValueError(f"unknown serving backend {choice!r}: expected one of {', '.join(BACKENDS)}")
    if choice == "transformers":
        return "transformers", None
    why = vllm_unavailable(device)
    return ("transformers" if why else "vllm"), why


class ServingError(Exception):
    """vLLM refused or failed a request; `code` is what the caller sees."""

    def __init__(self, message: str, code: str = "inference_error") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Engine:
    """One vLLM OpenAI server: its URL, and its child process when this worker started it."""

    url: str
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    #: The model name the server answers to (read from /v1/models once it is up).
    model: str = ""
    #: Whether the model has a chat template (None: not looked up yet).
    chat_template: bool | None = None
    source: str = ""
    adapters: set[str] = field(default_factory=set)

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        # The server runs in its own session with its engine processes: stop the whole group.
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        except ProcessLookupError:
            pass


#: Starts a vLLM server for a model source (a hub id or a folder) and returns it; the backend then
#: waits until it answers /v1/models.
Launcher = Callable[[str], Engine]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cuda_visible_devices(device: str, current: str | None) -> str | None:
    """CUDA_VISIBLE_DEVICES for a child that must see only `device` (`cuda:N`, N counted among the
    devices this process sees); None to leave it as it is (`cuda`)."""
    if ":" not in device:
        return None
    index = int(device.split(":", 1)[1])
    if current:
        visible = [d.strip() for d in current.split(",") if d.strip()]
        return visible[index] if index < len(visible) else str(index)
    return str(index)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the worker dies (Linux), so a killed worker does not
    leave a server holding the GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_DEATHSIG
    except (OSError, AttributeError):
        pass


class VllmLauncher:
    """Starts `python -m vllm.entrypoints.openai.api_server` for a model, logging to the workdir."""

    def __init__(
        self,
        workdir: Path,
        device: str = "cuda",
        max_loras: int = 4,
        max_lora_rank: int = 64,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
    ) -> None:
        self.workdir, self.device, self.python = workdir, device, python
        self.max_loras, self.max_lora_rank, self.extra_args = max_loras, max_lora_rank, list(extra_args)
        self.started = 0

    def command(self, source: str, port: int) -> list[str]:
        return [
            self.python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            source,
            "--enable-lora",
            "--max-loras",
            str(self.max_loras),
            "--max-lora-rank",
            str(self.max_lora_rank),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self.extra_args,  # last: vLLM's parser lets a later flag win
        ]

    def __call__(self, source: str) -> Engine:
        port = free_port()
        # The server needs none of the worker's credentials.
        env = {k: v for k, v in os.environ.items() if k != "TUNERY_WORKER_TOKEN"}
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        visible = cuda_visible_devices(self.device, os.environ.get("CUDA_VISIBLE_DEVICES"))
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        self.started += 1
        log_path = self.workdir / "serve" / f"vllm-{os.getpid()}-{self.started}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        command = self.command(source, port)
        log.info("starting vLLM for %s on port %d (log: %s)", source, port, log_path)
        with open(log_path, "ab") as out:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # a Ctrl-C at the terminal reaches the worker, which stops it
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        return Engine(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)


def _has_chat_template(source: str) -> bool:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    return bool(getattr(tokenizer, "chat_template", None))


class VllmBackend:
    """Serves through vLLM OpenAI servers, one per base model, with adapters loaded at runtime."""

    name = "vllm"
    concurrent = True

    def __init__(
        self,
        client: WorkerClient,
        workdir: Path,
        launcher: Launcher,
        *,
        startup_timeout: float = 1800,
        read_timeout: float = 600,
        has_chat_template: Callable[[str], bool] = _has_chat_template,
    ) -> None:
        self.client, self.workdir, self.launcher = client, workdir, launcher
        self.startup_timeout = startup_timeout
        self.has_chat_template = has_chat_template
        self.engines: dict[str, Engine] = {}
        # Starting servers and loading adapters one request at a time; streams run side by side.
        self.lock = threading.Lock()
        self.http = httpx.Client(timeout=httpx.Timeout(30, read=read_timeout))

    # -- the Backend interface

    def load(self, target: dict[str, Any], token: str) -> None:
        self._model_for(target, token)

    def unload(self, target: dict[str, Any]) -> None:
        with self.lock:
            self._unload(target)

    def _unload(self, target: dict[str, Any]) -> None:
        adapter = target.get("adapter")
        engine = self.engines.get(f"base:{target.get('base_source')}")
        if not adapter or engine is None:
            return
        name = f"adapter_{adapter['key']}"
        if name not in engine.adapters:
            return
        engine.adapters.discard(name)
        if engine.exited():
            return
        response = self.http.post(f"{engine.url}/v1/unload_lora_adapter", json={"lora_name": name})
        if response.status_code >= 400:
            log.warning("vLLM did not unload %s: %s %s", name, response.status_code, response.text[:500])

    def generate(
        self, target: dict[str, Any], request: dict[str, Any], token: str, send: Send
    ) -> dict[str, Any]:
        engine, model = self._model_for(target, token)
        params, input_ = request["params"], request["input"]
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": int(params["max_tokens"]),
            "temperature": float(params["temperature"]),
            "top_p": float(params["top_p"]),
            "stream": True,
            # Usage in every chunk: a request the caller leaves still has its counts so far.
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
        if params.get("stop"):
            body["stop"] = list(params["stop"])
        if params.get("seed") is not None:
            body["seed"] = int(params["seed"])
        if input_["kind"] == "chat":
            if engine.chat_template is None:
                with self.lock:
                    engine.chat_template = self.has_chat_template(engine.source)
            if engine.chat_template:
                path, body["messages"] = "/v1/chat/completions", list(input_["messages"])
            else:
                path, body["prompt"] = "/v1/completions", plain_chat_prompt(input_["messages"])
        else:
            path, body["prompt"] = "/v1/completions", str(input_["prompt"])
        return self._stream(engine, path, body, send)

    def close(self) -> None:
        with self.lock:
            for engine in self.engines.values():
                engine.close()
            self.engines.clear()
        self.http.close()

    # -- engines and adapters

    def _model_for(self, target: dict[str, Any], token: str) -> tuple[Engine, str]:
        """The engine serving `target`'s base (started if need be) and the model name to ask for:
        the adapter's (loaded into it once), or the base's."""
        with self.lock:
            return self._model_for_locked(target, token)

    def _model_for_locked(self, target: dict[str, Any], token: str) -> tuple[Engine, str]:
        if target.get("model_files"):
            files = target["model_files"]
            key = f"model:{files['key']}"
            if key not in self.engines or self.engines[key].exited():
                folder = download_files(self.client, self.workdir, files, token)
                self.engines[key] = self._start(str(folder))
            return self.engines[key], self.engines[key].model
        source = target.get("base_source")
        if not source:
            raise InvalidConfig("the request names no model to load", param="model")
        key = f"base:{source}"
        if key not in self.engines or self.engines[key].exited():
            self.engines[key] = self._start(checked_source(str(source)))
        engine = self.engines[key]
        adapter = target.get("adapter")
        if not adapter:
            return engine, engine.model
        name = f"adapter_{adapter['key']}"
        if name not in engine.adapters:
            path = download_files(self.client, self.workdir, adapter, token)
            response = self.http.post(
                f"{engine.url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)}
            )
            if response.status_code >= 400:
                raise ServingError(f"vLLM did not load the adapter: {_error_text(response)}")
            engine.adapters.add(name)
        return engine, name

    def _start(self, source: str) -> Engine:
        engine = self.launcher(source)
        engine.source = engine.source or source
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if engine.exited():
                tail = engine.log_tail()
                oom = "out of memory" in tail.lower() or "OutOfMemoryError" in tail
                raise ServingError(
                    f"vLLM exited while starting {source}: {tail[-1500:]}",
                    code="out_of_memory" if oom else "inference_error",
                )
            try:
                response = self.http.get(f"{engine.url}/v1/models", timeout=5)
                if response.status_code == 200:
                    engine.model = str(response.json()["data"][0]["id"])
                    log.info("vLLM serves %s at %s", engine.model, engine.url)
                    return engine
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                engine.close()
                raise ServingError(f"vLLM did not start {source} within {self.startup_timeout:.0f} s")
            time.sleep(1)

    # -- one streamed request

    def _stream(self, engine: Engine, path: str, body: dict[str, Any], send: Send) -> dict[str, Any]:
        pending, finish, cancelled = "", None, False
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        last_report = 0.0
        # Leaving the `with` closes the connection; vLLM aborts a request whose client went away.
        with self.http.stream("POST", f"{engine.url}{path}", json=body) as response:
            if response.status_code >= 400:
                response.read()
                raise ServingError(f"vLLM refused the request: {_error_text(response)}")
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error") or chunk.get("object") == "error":
                    error = chunk.get("error") or chunk
                    message = error.get("message", error) if isinstance(error, dict) else error
                    raise ServingError(f"vLLM failed the request: {message}")
                if chunk.get("usage"):
                    usage = {
                        "prompt_tokens": int(chunk["usage"].get("prompt_tokens") or 0),
                        "completion_tokens": int(chunk["usage"].get("completion_tokens") or 0),
                    }
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    pending += choice.get("text") or delta.get("content") or ""
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                if pending and time.monotonic() - last_report >= REPORT_INTERVAL:
                    cancelled = send(pending)
                    pending, last_report = "", time.monotonic()
                    if cancelled:
                        break
        if pending and not cancelled:
            send(pending)
        return {"finish_reason": "length" if finish == "length" else "stop", "usage": usage}


def _error_text(response: httpx.Response) -> str:
    try:
        answer = response.json()
    except ValueError:
        return f"{response.status_code} {response.text[:1000]}"
    error = answer.get("error", answer) if isinstance(answer, dict) else answer
    message = error.get("message", error) if isinstance(error, dict) else error
    return f"{response.status_code} {message}"


def make_backend(
    name: str,
    client: WorkerClient,
    device: str,
    workdir: Path,
    *,
    max_loras: int = 4,
    max_lora_rank: int = 64,
    vllm_args: Sequence[str] = (),
) -> Backend:
    """The backend `name` (as `choose_backend` picked it) for a serving worker."""
    if name == "vllm":
        launcher = VllmLauncher(
            workdir, device, max_loras=max_loras, max_lora_rank=max_lora_rank, extra_args=vllm_args
        )
        return VllmBackend(client, workdir, launcher)
    return TransformersBackend(client, device, workdir)
