"""The vLLM serving backend: against a fake vLLM OpenAI server here (CPU), and for real on a CUDA
machine with vllm installed (skipped elsewhere, saying why)."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from tunery_worker.serve import ServingWorker, TransformersBackend
from tunery_worker.serve_vllm import (
    Engine,
    ServingError,
    VllmBackend,
    VllmLauncher,
    choose_backend,
    cuda_visible_devices,
    vllm_unavailable,
)

BASE_NAME = "the-base"


class FakeVllm:
    """vLLM's OpenAI server as the backend uses it: /v1/models, runtime LoRA load/unload, streamed
    completions and chat completions. The text is deterministic: "w0 w1 …" (with an adapter, "a0 a1 …"),
    one word a token, cut before a stop string; `delay` seconds between tokens."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, body)
        self.adapters: dict[str, str] = {}  # lora_name → lora_path
        self.aborted = threading.Event()  # a stream whose client went away before its end
        self.chunks_written = 0
        self.streaming = self.most_at_once = 0  # streams open now, and at most
        self.counting = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                fake.requests.append(("GET", self.path, None))
                if self.path == "/v1/models":
                    models = [{"id": BASE_NAME, "object": "model"}]
                    models += [{"id": name, "object": "model", "parent": BASE_NAME} for name in fake.adapters]
                    self.json(200, {"object": "list", "data": models})
                else:
                    self.json(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body))
                if self.path == "/v1/load_lora_adapter":
                    if body["lora_name"] in fake.adapters:
                        self.json(400, {"object": "error", "message": "already loaded"})
                        return
                    fake.adapters[body["lora_name"]] = body["lora_path"]
                    self.text(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
                elif self.path == "/v1/unload_lora_adapter":
                    if fake.adapters.pop(body["lora_name"], None) is None:
                        self.json(404, {"object": "error", "message": "not loaded"})
                        return
                    self.text(200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")
                elif self.path in ("/v1/completions", "/v1/chat/completions"):
                    self.stream(body, chat=self.path.endswith("chat/completions"))
                else:
                    self.json(404, {"error": {"message": "not found"}})

            def json(self, status: int, answer: Any) -> None:
                self.text(status, json.dumps(answer), "application/json")

            def text(self, status: int, text: str, kind: str = "text/plain") -> None:
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def stream(self, body: dict[str, Any], chat: bool) -> None:
                if body["model"] != BASE_NAME and body["model"] not in fake.adapters:
                    self.json(
                        404, {"object": "error", "message": f"The model `{body['model']}` does not exist."}
                    )
                    return
                letter = "w" if body["model"] == BASE_NAME else "a"
                prompt_tokens = 7 if chat else len(str(body["prompt"]).split())
                words = [f"{letter}{i} " for i in range(body["max_tokens"])]
                finish = "length"
                text = "".join(words)
                cuts = [text.index(stop) for stop in body.get("stop") or [] if stop in text]
                if cuts:
                    # The words before the first stop string (the fake's stops start a word).
                    words, finish = words[: text[: min(cuts)].count(" ")], "stop"
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
                with fake.counting:
                    fake.streaming += 1
                    fake.most_at_once = max(fake.most_at_once, fake.streaming)
                try:
                    if chat:
                        self.event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                    for i, word in enumerate(words):
                        time.sleep(fake.delay)
                        last = i == len(words) - 1
                        piece: dict[str, Any] = {"delta": {"content": word}} if chat else {"text": word}
                        choice = {"index": 0, **piece, "finish_reason": finish if last else None}
                        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": i + 1}
                        self.event({"choices": [choice], "usage": usage})
                        fake.chunks_written += 1
                    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words)}
                    self.event({"choices": [], "usage": usage})
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    fake.aborted.set()
                finally:
                    with fake.counting:
                        fake.streaming -= 1

            def event(self, chunk: dict[str, Any]) -> None:
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def posts(self, path: str) -> list[Any]:
        return [body for method, p, body in self.requests if method == "POST" and p == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NoDownloads:
    def download(self, *args: Any, **kwargs: Any) -> Path:
        raise AssertionError("nothing should be downloaded")


@pytest.fixture
def fake() -> Iterator[FakeVllm]:
    server = FakeVllm()
    yield server
    server.close()


class Launches:
    """The launcher, pointed at the fake server: records the sources it was asked to start."""

    def __init__(self, fake: FakeVllm) -> None:
        self.fake = fake
        self.sources: list[str] = []

    def __call__(self, source: str) -> Engine:
        self.sources.append(source)
        return Engine(url=self.fake.url)


def backend_on(fake: FakeVllm, tmp_path: Path, chat_template: bool = True) -> tuple[VllmBackend, Launches]:
    launches = Launches(fake)
    backend = VllmBackend(
        NoDownloads(),  # type: ignore[arg-type]
        tmp_path,
        launches,
        has_chat_template=lambda source: chat_template,
    )
    return backend, launches


class Recorder:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.texts: list[str] = []
        self.cancel_after = cancel_after

    def __call__(self, text: str) -> bool:
        self.texts.append(text)
        return self.cancel_after is not None and len(self.texts) >= self.cancel_after


def base(path: Path) -> dict[str, Any]:
    return {"name": "tiny", "base_source": str(path), "adapter": None, "model_files": None}


def with_adapter(path: Path, key: str = "job_a") -> dict[str, Any]:
    return {**base(path), "adapter": {"key": key, "files": []}}


def request(kind: str = "completion", max_tokens: int = 5, **params: Any) -> dict[str, Any]:
    input_: dict[str, Any] = (
        {"kind": "chat", "messages": [{"role": "user", "content": "Say hi"}]}
        if kind == "chat"
        else {"kind": "completion", "prompt": "Once upon a time"}
    )
    defaults = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0, "stop": [], "seed": None}
    return {"input": input_, "params": {**defaults, **params}}


def test_a_completion_maps_its_params_streams_its_text_and_reports_finish_and_usage(
    fake: FakeVllm, tmp_path: Path
) -> None:
    backend, launches = backend_on(fake, tmp_path)
    send = Recorder()
    req = request(max_tokens=5, temperature=0.7, top_p=0.9, stop=["zz"], seed=3)
    outcome = backend.generate(base(tmp_path), req, "infreq_1", send)
    assert "".join(send.texts) == "w0 w1 w2 w3 w4 "
    assert outcome == {"finish_reason": "length", "usage": {"prompt_tokens": 4, "completion_tokens": 5}}
    assert fake.requests[0] == ("GET", "/v1/models", None)  # waited for the server, read its model name
    assert fake.posts("/v1/completions") == [
        {
            "model": BASE_NAME,
            "prompt": "Once upon a time",
            "max_tokens": 5,
            "temperature": 0.7,
            "top_p": 0.9,
            "stop": ["zz"],
            "seed": 3,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        }
    ]
    # The server is kept: a second request starts nothing, and no seed/stop means none is sent.
    again = Recorder()
    assert backend.generate(base(tmp_path), request(max_tokens=2), "infreq_2", again)["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 2,
    }
    assert "".join(again.texts) == "w0 w1 "
    assert "seed" not in fake.posts("/v1/completions")[1] and "stop" not in fake.posts("/v1/completions")[1]
    assert launches.sources == [str(tmp_path.resolve())]


def test_chat_goes_to_chat_completions_and_a_stop_string_ends_it(fake: FakeVllm, tmp_path: Path) -> None:
    backend, _ = backend_on(fake, tmp_path)
    send = Recorder()
    outcome = backend.generate(base(tmp_path), request("chat", max_tokens=8, stop=["w3"]), "infreq_1", send)
    assert "".join(send.texts) == "w0 w1 w2 "
    assert outcome == {"finish_reason": "stop", "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    (sent,) = fake.posts("/v1/chat/completions")
    assert sent["messages"] == [{"role": "user", "content": "Say hi"}] and "prompt" not in sent
    assert sent["stop"] == ["w3"] and sent["stream"] is True


def test_chat_on_a_model_without_a_template_is_a_plain_prompt(fake: FakeVllm, tmp_path: Path) -> None:
    backend, _ = backend_on(fake, tmp_path, chat_template=False)
    backend.generate(base(tmp_path), request("chat", max_tokens=2), "infreq_1", Recorder())
    assert fake.posts("/v1/chat/completions") == []
    assert fake.posts("/v1/completions")[0]["prompt"] == "user: Say hi\nassistant:"


def test_the_chat_template_is_looked_up_on_the_model(fake: FakeVllm, tiny_llama: Path) -> None:
    backend = VllmBackend(NoDownloads(), tiny_llama.parent, Launches(fake))  # type: ignore[arg-type]
    backend.generate(base(tiny_llama), request("chat", max_tokens=2), "infreq_1", Recorder())
    assert len(fake.posts("/v1/chat/completions")) == 1  # the tiny model has a template


def test_an_adapter_loads_once_at_runtime_and_unloads(fake: FakeVllm, tmp_path: Path) -> None:
    backend, launches = backend_on(fake, tmp_path)
    backend.load(with_adapter(tmp_path), "infreq_0")
    loads = [{"lora_name": "adapter_job_a", "lora_path": str(tmp_path / "serve" / "job_a")}]
    assert fake.posts("/v1/load_lora_adapter") == loads

    tuned, plain = Recorder(), Recorder()
    backend.generate(with_adapter(tmp_path), request(max_tokens=3), "infreq_1", tuned)
    backend.generate(base(tmp_path), request(max_tokens=3), "infreq_2", plain)
    backend.generate(with_adapter(tmp_path), request(max_tokens=3), "infreq_3", Recorder())
    assert "".join(tuned.texts) == "a0 a1 a2 " and "".join(plain.texts) == "w0 w1 w2 "
    assert [r["model"] for r in fake.posts("/v1/completions")] == [
        "adapter_job_a",
        BASE_NAME,
        "adapter_job_a",
    ]
    assert fake.posts("/v1/load_lora_adapter") == loads  # loaded once
    assert len(launches.sources) == 1  # adapters share their base's server

    backend.unload(with_adapter(tmp_path))
    assert fake.posts("/v1/unload_lora_adapter") == [{"lora_name": "adapter_job_a"}]
    assert fake.adapters == {}
    backend.unload(with_adapter(tmp_path))  # not loaded: nothing to send
    assert len(fake.posts("/v1/unload_lora_adapter")) == 1
    backend.generate(with_adapter(tmp_path), request(max_tokens=1), "infreq_4", Recorder())
    assert len(fake.posts("/v1/load_lora_adapter")) == 2  # asked for again: loaded again


def test_a_caller_that_leaves_closes_the_stream(tmp_path: Path) -> None:
    fake = FakeVllm(delay=0.01)
    try:
        backend, _ = backend_on(fake, tmp_path)
        send = Recorder(cancel_after=1)
        started = time.monotonic()
        outcome = backend.generate(base(tmp_path), request(max_tokens=500), "infreq_1", send)
        assert time.monotonic() - started < 3  # 500 tokens would take 5 s
        assert len(send.texts) == 1
        assert fake.aborted.wait(5), "the server never saw its client go"
        assert fake.chunks_written < 500
        assert 0 < outcome["usage"]["completion_tokens"] < 500  # the counts so far
    finally:
        fake.close()


class FakeClient:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report_inference(self, request_id: str, report: dict[str, Any]) -> bool:
        self.reports.append(report)
        return False


def test_the_worker_answers_through_the_vllm_backend(fake: FakeVllm, tmp_path: Path) -> None:
    client = FakeClient()
    backend, _ = backend_on(fake, tmp_path)
    worker = ServingWorker(
        client,  # type: ignore[arg-type]
        worker_id="w",
        device="cuda",
        workdir=tmp_path,
        backend=backend,
    )
    worker.answer({"request_id": "inf_1", "request_token": "infreq_1", "target": base(tmp_path), **request()})
    *texts, last = client.reports
    assert "".join(r["text"] for r in texts) == "w0 w1 w2 w3 w4 "
    assert last == {
        "request_token": "infreq_1",
        "worker_id": "w",
        "done": True,
        "finish_reason": "length",
        "usage": {"prompt_tokens": 4, "completion_tokens": 5},
    }
    # An adapter vLLM refuses (already loaded behind the backend's back) is the caller's error.
    fake.adapters["adapter_job_b"] = "elsewhere"
    client.reports.clear()
    target = with_adapter(tmp_path, "job_b")
    worker.answer({"request_id": "inf_2", "request_token": "infreq_2", "target": target, **request()})
    (error,) = client.reports
    assert error["done"] is True and error["error"]["code"] == "inference_error"
    assert "already loaded" in error["error"]["message"]


class QueueClient(FakeClient):
    """Hands out `requests` to whichever claim loop asks first."""

    def __init__(self, requests: list[dict[str, Any]]) -> None:
        super().__init__()
        self.queue, self.lock = list(requests), threading.Lock()
        self.backends: set[str | None] = set()  # what the claims said they serve with

    def claim_inference(
        self, worker_id: str, wait_seconds: float, backend: str | None = None
    ) -> dict[str, Any] | None:
        with self.lock:
            self.backends.add(backend)
            if self.queue:
                return self.queue.pop(0)
        time.sleep(0.01)
        return None


def test_requests_run_at_once_on_vllm_and_one_at_a_time_on_transformers(tmp_path: Path) -> None:
    fake = FakeVllm(delay=0.05)
    try:
        backend, _ = backend_on(fake, tmp_path)
        claims = [
            {"request_id": f"inf_{i}", "request_token": f"infreq_{i}", "target": base(tmp_path), **request()}
            for i in (1, 2)
        ]
        client = QueueClient(claims)
        worker = ServingWorker(
            client,  # type: ignore[arg-type]
            worker_id="w",
            device="cuda",
            workdir=tmp_path,
            backend=backend,
            concurrency=2,
            once=True,  # each claim loop answers one request, then stops
        )
        assert worker.run() == 0
        assert fake.most_at_once == 2
        assert client.backends == {"vllm"}  # the server's status shows the engine
        assert [r["usage"]["completion_tokens"] for r in client.reports if r.get("done")] == [5, 5]
    finally:
        fake.close()
    serial = ServingWorker(FakeClient(), worker_id="w", device="cpu", workdir=tmp_path, concurrency=2)  # type: ignore[arg-type]
    assert serial.concurrency == 1


def test_a_server_that_dies_while_starting_is_an_error_with_its_log(tmp_path: Path) -> None:
    # The real launcher, with a python that has no vllm here: the child exits at once.
    launcher = VllmLauncher(tmp_path, "cuda:1", extra_args=["--gpu-memory-utilization", "0.4"])
    command = launcher.command("some/model", 8123)
    assert command[1:] == [
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "some/model",
        "--enable-lora",
        "--max-loras",
        "4",
        "--max-lora-rank",
        "64",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
        "--gpu-memory-utilization",
        "0.4",
    ]
    if vllm_unavailable("cuda") is None:
        pytest.skip("vllm is installed here: the child would start for real")
    backend = VllmBackend(NoDownloads(), tmp_path, launcher)  # type: ignore[arg-type]
    with pytest.raises(ServingError, match="(?s)vLLM exited while starting some/model.*vllm"):
        backend.generate({**base(tmp_path), "base_source": "some/model"}, request(), "infreq_1", Recorder())
    backend.close()


def test_the_backend_choice() -> None:
    assert choose_backend("transformers", "cuda") == ("transformers", None)
    name, why = choose_backend("auto", "cpu")
    assert name == "transformers" and why and "cpu" in why
    if vllm_unavailable("cuda") is not None:
        name, why = choose_backend("auto", "cuda")
        assert name == "transformers" and why
        assert choose_backend("vllm", "cuda")[0] == "transformers"  # the CLI refuses this one
    with pytest.raises(ValueError):
        choose_backend("tgi", "cuda")
    assert cuda_visible_devices("cuda", None) is None
    assert cuda_visible_devices("cuda:1", None) == "1"
    assert cuda_visible_devices("cuda:1", "4,6") == "6"


def test_the_cli_picks_the_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tunery_worker import cli

    seen: list[tuple[str, str]] = []

    def run(self: ServingWorker) -> int:
        seen.append((self.backend.name, self.worker_id))
        return 0

    monkeypatch.setattr(ServingWorker, "run", run)
    args = ["--server", "http://127.0.0.1:9", "--token", "t", "--device", "cpu", "--workdir", str(tmp_path)]
    assert cli.main([*args, "--serve"]) == 0  # auto, on a CPU
    assert cli.main([*args, "--serve", "--serve-backend", "transformers", "--worker-id", "me"]) == 0
    assert seen[0][0] == "transformers" and "-serve-transformers-" in seen[0][1]
    assert seen[1] == ("transformers", "me")
    with pytest.raises(SystemExit) as refused:
        cli.main([*args, "--serve", "--serve-backend", "vllm"])
    assert refused.value.code == 2 and len(seen) == 2


# -- the real thing, on a CUDA machine with vllm installed


def real_vllm_or_skip() -> None:
    why = vllm_unavailable("cuda")
    if why is not None:
        pytest.skip(f"vLLM needs CUDA and the vllm package; this machine has neither: {why}")


@pytest.mark.gpu
@pytest.mark.slow
def test_vllm_serves_the_tiny_model_as_transformers_does(tmp_path: Path) -> None:
    real_vllm_or_skip()
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tunery_worker.tiny_model import make_tiny_model

    # head_dim 64 (vLLM's attention kernels want a common size); fp32 on both sides so that greedy
    # picks the same tokens.
    model_dir = make_tiny_model(tmp_path / "tiny", hidden=256, heads=4, kv_heads=2, intermediate=512)
    torch.manual_seed(0)
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    )
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1.0)
    peft_model.save_pretrained(tmp_path / "serve" / "job_a")

    launcher = VllmLauncher(
        tmp_path,
        "cuda",
        max_lora_rank=8,
        extra_args=["--dtype", "float32", "--gpu-memory-utilization", "0.3", "--enforce-eager"],
        python=sys.executable,
    )
    vllm_backend = VllmBackend(NoDownloads(), tmp_path, launcher, startup_timeout=600)  # type: ignore[arg-type]
    reference = TransformersBackend(NoDownloads(), "cpu", tmp_path)  # type: ignore[arg-type]
    try:
        for target in (base(model_dir), with_adapter(model_dir)):
            for kind in ("completion", "chat"):
                req = request(kind, max_tokens=16)
                got, want = Recorder(), Recorder()
                out = vllm_backend.generate(target, req, "infreq", got)
                ref = reference.generate(target, req, "infreq", want)
                label = f"{kind} {'with' if target['adapter'] else 'without'} adapter"
                assert "".join(got.texts) == "".join(want.texts), label
                assert out["usage"] == ref["usage"], label
                assert out["finish_reason"] == ref["finish_reason"], label
    finally:
        vllm_backend.close()
