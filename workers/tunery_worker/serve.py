"""Serving: a worker started with `--serve` answers inference requests instead of running jobs.

It long-polls the server for a request (`/v1/workers/inference/claim`), hands it to its backend, and
reports the text as it comes. A report answered `cancelled` (the caller left) stops it.

A backend loads what a request names (a base model by source, a LoRA adapter over it, or a full
model's files; each kept for the next request) and generates. Two exist, behind one small interface
(`Backend`: load, unload, generate, close): `TransformersBackend` here (models in this process,
adapters side by side on their base through peft, transformers `generate` with its KV cache; greedy
when temperature is 0, sampled with temperature/top_p otherwise, repeatable with a seed), and
`VllmBackend` (serve_vllm.py: vLLM's OpenAI server as a child process, on a CUDA worker).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from tunery_worker.client import WorkerClient
from tunery_worker.errors import InvalidConfig
from tunery_worker.jobs.model_source import checked_source
from tunery_worker.modeling import load_dtype, load_model_and_tokenizer

log = logging.getLogger(__name__)

#: Text is reported at most this often while generating (seconds).
REPORT_INTERVAL = 0.05


@dataclass
class Loaded:
    model: PreTrainedModel | PeftModel
    tokenizer: PreTrainedTokenizerBase
    adapters: set[str] = field(default_factory=set)


class ModelCache:
    """Models in memory by what they were loaded from; adapters join their base's peft wrapper."""

    def __init__(self, client: WorkerClient, device: str, workdir: Path) -> None:
        self.client, self.device, self.workdir = client, device, workdir
        self.loaded: dict[str, Loaded] = {}

    def get(self, target: dict[str, Any], token: str) -> tuple[Loaded, str | None]:
        """The model for `target`, and the adapter to activate (None: the base itself)."""
        if target.get("model_files"):
            files = target["model_files"]
            key = f"model:{files['key']}"
            if key not in self.loaded:
                self.loaded[key] = self._load(str(self._download(files, token)))
            return self.loaded[key], None
        source = target.get("base_source")
        if not source:
            raise InvalidConfig("the request names no model to load", param="model")
        key = f"base:{source}"
        if key not in self.loaded:
            self.loaded[key] = self._load(checked_source(str(source)))
        entry = self.loaded[key]
        adapter = target.get("adapter")
        if not adapter:
            return entry, None
        name = f"adapter_{adapter['key']}"
        if name not in entry.adapters:
            path = str(self._download(adapter, token))
            if isinstance(entry.model, PeftModel):
                entry.model.load_adapter(path, adapter_name=name)
            else:
                entry.model = PeftModel.from_pretrained(entry.model, path, adapter_name=name)
            entry.model.eval()
            entry.adapters.add(name)
        return entry, name

    def load(self, target: dict[str, Any], token: str) -> None:
        """Loads `target` (and its adapter) into memory ahead of requests (POST /v1/adapters/{name}/load)."""
        self.get(target, token)

    def unload(self, target: dict[str, Any]) -> None:
        """Drops `target`'s adapter from memory; its base stays for other requests."""
        adapter = target.get("adapter")
        entry = self.loaded.get(f"base:{target.get('base_source')}")
        name = f"adapter_{adapter['key']}" if adapter else None
        if entry is None or name not in entry.adapters or not isinstance(entry.model, PeftModel):
            return
        entry.adapters.discard(name)
        if entry.adapters:
            entry.model.set_adapter(sorted(entry.adapters)[0])
            entry.model.delete_adapter(name)
        else:
            # The last adapter: back to the bare base model.
            entry.model = entry.model.unload()

    def _load(self, source: str) -> Loaded:
        model, tokenizer = load_model_and_tokenizer(source, device=self.device, dtype=load_dtype(self.device))
        model.eval()
        return Loaded(model, tokenizer)

    def _download(self, files: dict[str, Any], token: str) -> Path:
        return download_files(self.client, self.workdir, files, token)


def download_files(client: WorkerClient, workdir: Path, files: dict[str, Any], token: str) -> Path:
    """A request's model or adapter files (`{key, files}`), cached under the workdir by key."""
    folder = workdir / "serve" / str(files["key"])
    for f in files["files"]:
        dest = folder / str(f["name"])
        if not dest.exists():
            client.download(
                f"/v1/workers/files/{f['file_id']}",
                dest,
                sha256=f["sha256"],
                size_bytes=f["size_bytes"],
                lease_token=token,
            )
    return folder


def plain_chat_prompt(messages: list[dict[str, Any]]) -> str:
    """Chat messages for a model without a chat template (a plain base model): one "role: content"
    line each, then the assistant's turn."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, input_: dict[str, Any]) -> list[int]:
    """The prompt's token ids: chat messages through the model's chat template, or the prompt as is."""
    if input_["kind"] == "completion":
        return list(tokenizer(input_["prompt"])["input_ids"])
    messages = input_["messages"]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes the special tokens itself.
        return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])
    return list(tokenizer(plain_chat_prompt(messages))["input_ids"])


class Generation(BaseStreamer, StoppingCriteria):  # type: ignore[misc]
    """Follows one `generate` call: decodes new tokens, reports text, stops on a stop string or a
    cancelled caller. Text that might be the start of a stop string is held back until it is not."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str], send: Any) -> None:
        self.tokenizer, self.stop, self.send = tokenizer, stop, send
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text reported
        self.prompt_seen = False
        self.stopped_by_string = False
        self.cancelled = False
        self.last_report = 0.0

    # streamer: generate passes the prompt first, then each new token
    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        if time.monotonic() - self.last_report >= REPORT_INTERVAL:
            self.flush(final=False)

    def end(self) -> None:
        pass

    # stopping criterion: checked after every token
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if any(s in self.text() for s in self.stop):
            self.stopped_by_string = True
        done = self.stopped_by_string or self.cancelled
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)

    def text(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def final_text(self) -> str:
        text = self.text()
        cuts = [text.index(s) for s in self.stop if s in text]
        return text[: min(cuts)] if cuts else text

    def flush(self, final: bool) -> None:
        text = self.final_text()
        if not final:
            # Hold back a tail that could still become a stop string, and a half-decoded character.
            hold = max((len(s) - 1 for s in self.stop), default=0)
            text = text[: max(len(text) - hold, self.sent)].rstrip("\ufffd")
        if len(text) > self.sent or final:
            if self.send(text[self.sent :], final):
                self.cancelled = True
            self.sent = max(self.sent, len(text))
        self.last_report = time.monotonic()


def generate(loaded: Loaded, adapter: str | None, request: dict[str, Any], send: Any) -> dict[str, Any]:
    """Runs one request, reporting text through `send(text, final)`; returns finish_reason and usage."""
    tokenizer, model, params = loaded.tokenizer, loaded.model, request["params"]
    ids = prompt_ids(tokenizer, request["input"])
    device = next(model.parameters()).device
    follow = Generation(tokenizer, list(params["stop"]), send)
    sample = params["temperature"] > 0
    options: dict[str, Any] = {"do_sample": sample, "max_new_tokens": params["max_tokens"]}
    if sample:
        options.update(temperature=params["temperature"], top_p=params["top_p"])
    if params.get("seed") is not None:
        torch.manual_seed(int(params["seed"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode(), _adapter(model, adapter):
        model.generate(  # type: ignore[operator]
            input_ids=torch.tensor([ids], device=device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
            streamer=follow,
            stopping_criteria=StoppingCriteriaList([follow]),
            pad_token_id=pad,
            **options,
        )
    hit_eos = bool(follow.ids) and follow.ids[-1] == tokenizer.eos_token_id
    length = len(follow.ids) >= params["max_tokens"] and not (follow.stopped_by_string or hit_eos)
    return {
        "finish_reason": "length" if length else "stop",
        "usage": {"prompt_tokens": len(ids), "completion_tokens": len(follow.ids)},
        "follow": follow,
    }


class _adapter:
    """Activates `name` on a peft model for one call, or runs the bare base when `name` is None."""

    def __init__(self, model: Any, name: str | None) -> None:
        self.model, self.name = model, name
        self.inner: Any = None

    def __enter__(self) -> None:
        if not isinstance(self.model, PeftModel):
            return
        if self.name is None:
            self.inner = self.model.disable_adapter()
            self.inner.__enter__()
        else:
            self.model.set_adapter(self.name)

    def __exit__(self, *exc: Any) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


#: `send(text)` relays text to the caller and answers True when the caller has left (stop generating).
Send = Callable[[str], bool]


class Backend(Protocol):
    """What a serving worker generates with. `target` and `request` are the claim's (ClaimedInference);
    `token` is the request token that file downloads need."""

    name: str
    #: Whether requests may run at once (one claim loop each): vLLM batches them; transformers does not.
    concurrent: bool

    def load(self, target: dict[str, Any], token: str) -> None:
        """Loads `target` (and its adapter) ahead of requests (POST /v1/adapters/{name}/load)."""

    def unload(self, target: dict[str, Any]) -> None:
        """Drops `target`'s adapter; its base stays for other requests."""

    def generate(
        self, target: dict[str, Any], request: dict[str, Any], token: str, send: Send
    ) -> dict[str, Any]:
        """Runs one request, relaying all of its text through `send`; returns `{finish_reason, usage}`."""
        ...

    def close(self) -> None:
        """Lets go of what the backend holds (child processes); called when the worker stops."""


class TransformersBackend:
    """Models in this process (`ModelCache`), generated with transformers `generate`."""

    name = "transformers"
    concurrent = False

    def __init__(self, client: WorkerClient, device: str, workdir: Path) -> None:
        self.models = ModelCache(client, device, workdir)

    def load(self, target: dict[str, Any], token: str) -> None:
        self.models.load(target, token)

    def unload(self, target: dict[str, Any]) -> None:
        self.models.unload(target)

    def generate(
        self, target: dict[str, Any], request: dict[str, Any], token: str, send: Send
    ) -> dict[str, Any]:
        loaded, adapter = self.models.get(target, token)
        outcome = generate(loaded, adapter, request, lambda text, final: bool(text) and send(text))
        follow: Generation = outcome["follow"]
        follow.flush(final=True)
        return {"finish_reason": outcome["finish_reason"], "usage": outcome["usage"]}

    def close(self) -> None:
        pass


class ServingWorker:
    """Claims inference requests and answers them until stopped: one at a time, or `concurrency` at
    once (one claim loop each) on a backend that runs requests together."""

    def __init__(
        self,
        client: WorkerClient,
        *,
        worker_id: str,
        device: str,
        workdir: Path,
        wait_seconds: float = 20,
        once: bool = False,
        backend: Backend | None = None,
        concurrency: int = 1,
    ) -> None:
        self.client, self.worker_id, self.wait_seconds, self.once = client, worker_id, wait_seconds, once
        self.backend: Backend = backend or TransformersBackend(client, device, workdir)
        if concurrency > 1 and not self.backend.concurrent:
            log.warning("the %s backend answers one request at a time: concurrency 1", self.backend.name)
            concurrency = 1
        self.concurrency = concurrency
        self.stopping = threading.Event()

    @property
    def shutdown_requested(self) -> bool:
        return self.stopping.is_set()

    def request_shutdown(self) -> None:
        """Finish the request in hand (if any), then stop claiming."""
        self.stopping.set()

    def run(self) -> int:
        log.info(
            "serving as %s with the %s backend (%d at once)",
            self.worker_id,
            self.backend.name,
            self.concurrency,
        )
        failures: list[BaseException] = []

        def slot() -> None:
            try:
                self._claim_loop()
            except BaseException as err:  # a slot that cannot claim stops the others too
                failures.append(err)
                self.stopping.set()

        others = [
            threading.Thread(target=slot, name=f"serve-{i}", daemon=True) for i in range(1, self.concurrency)
        ]
        for thread in others:
            thread.start()
        try:
            self._claim_loop()
        except BaseException:
            self.stopping.set()
            raise
        finally:
            for thread in others:
                while thread.is_alive():  # joined in steps: signals still reach the main thread
                    thread.join(timeout=1)
            self.backend.close()
        if failures:
            raise failures[0]
        return 0

    def _claim_loop(self) -> None:
        while not self.stopping.is_set():
            request = self.client.claim_inference(self.worker_id, self.wait_seconds, self.backend.name)
            if request is not None:
                self.answer(request)
            if self.once and request is not None:
                break

    def answer(self, request: dict[str, Any]) -> None:
        request_id, token = request["request_id"], request["request_token"]

        def report(**fields: Any) -> bool:
            return self.client.report_inference(
                request_id, {"request_token": token, "worker_id": self.worker_id, **fields}
            )

        try:
            kind = request["input"]["kind"]
            if kind == "load":
                self.backend.load(request["target"], token)
            elif kind == "unload":
                self.backend.unload(request["target"])
            if kind in ("load", "unload"):
                report(done=True, finish_reason="stop", usage={"prompt_tokens": 0, "completion_tokens": 0})
                return
            outcome = self.backend.generate(
                request["target"], request, token, lambda text: bool(text) and report(text=text)
            )
            report(done=True, finish_reason=outcome["finish_reason"], usage=outcome["usage"])
        except Exception as err:  # the caller gets the error; the worker goes on serving
            log.exception("inference request %s failed", request_id)
            oom = isinstance(err, torch.OutOfMemoryError)
            code = getattr(err, "code", None) or ("out_of_memory" if oom else "inference_error")
            report(done=True, error={"code": str(code), "message": str(err)[:2000]})
