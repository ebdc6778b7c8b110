"""Serving: real generation on a tiny local model, as a `--serve` worker answers inference requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunery_worker.serve import ModelCache, ServingWorker, generate


def request(
    max_tokens: int = 12,
    temperature: float = 0.0,
    seed: int | None = None,
    stop: list[str] | None = None,
    kind: str = "chat",
) -> dict[str, Any]:
    input_: dict[str, Any] = (
        {"kind": "chat", "messages": [{"role": "user", "content": "Say hi"}]}
        if kind == "chat"
        else {"kind": "completion", "prompt": "Once upon a time"}
    )
    return {
        "input": input_,
        "params": {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": 1.0,
            "stop": stop or [],
            "seed": seed,
        },
    }


class Recorder:
    """The reports a generation sends; answers `cancel_after` reports with "the caller left"."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.texts: list[str] = []
        self.cancel_after = cancel_after

    def __call__(self, text: str, final: bool) -> bool:
        if text:
            self.texts.append(text)
        return self.cancel_after is not None and len(self.texts) >= self.cancel_after


class NoDownloads:
    """A client for a cache that must not download: everything is local."""

    def download(self, *args: Any, **kwargs: Any) -> Path:
        raise AssertionError("nothing should be downloaded")


def run(cache: ModelCache, target: dict[str, Any], req: dict[str, Any], send: Recorder | None = None):
    loaded, adapter = cache.get(target, "infreq_test")
    send = send or Recorder()
    outcome = generate(loaded, adapter, req, send)
    outcome["follow"].flush(final=True)
    return "".join(send.texts), outcome


@pytest.fixture
def cache(tmp_path: Path) -> ModelCache:
    return ModelCache(NoDownloads(), "cpu", tmp_path)  # type: ignore[arg-type]


def base(path: Path) -> dict[str, Any]:
    return {"name": "tiny", "base_source": str(path), "adapter": None, "model_files": None}


def test_greedy_is_repeatable_and_stops_at_max_tokens(cache: ModelCache, tiny_llama: Path) -> None:
    first, outcome = run(cache, base(tiny_llama), request(max_tokens=12))
    again, _ = run(cache, base(tiny_llama), request(max_tokens=12))
    assert first == again and first
    assert outcome["finish_reason"] == "length"
    assert outcome["usage"]["completion_tokens"] == 12
    assert outcome["usage"]["prompt_tokens"] > 0
    assert len(cache.loaded) == 1  # the second request used the model in memory


def test_sampling_follows_the_seed(cache: ModelCache, tiny_llama: Path) -> None:
    texts = [
        run(cache, base(tiny_llama), request(temperature=1.5, seed=s, kind="completion"))[0]
        for s in (1, 1, 2)
    ]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_a_stop_string_ends_the_text_before_it_and_is_never_sent(cache: ModelCache, tiny_llama: Path) -> None:
    full, _ = run(cache, base(tiny_llama), request(max_tokens=24))
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    send = Recorder()
    text, outcome = run(cache, base(tiny_llama), request(max_tokens=24, stop=[stop]), send)
    assert text == full[: full.index(stop)]
    assert outcome["finish_reason"] == "stop"
    assert all(stop not in "".join(send.texts[: i + 1]) for i in range(len(send.texts)))


def test_a_caller_that_leaves_stops_generation(cache: ModelCache, tiny_llama: Path) -> None:
    _, outcome = run(cache, base(tiny_llama), request(max_tokens=200), Recorder(cancel_after=1))
    assert outcome["usage"]["completion_tokens"] < 200


def test_adapters_load_beside_their_base(cache: ModelCache, tiny_llama: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_llama),
        LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"),
    )
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=1.0)
    adapter_dir = tmp_path / "serve" / "job_a"
    model.save_pretrained(adapter_dir)
    with_adapter = {**base(tiny_llama), "adapter": {"key": "job_a", "files": []}}

    plain, _ = run(cache, base(tiny_llama), request(max_tokens=16))
    tuned, _ = run(cache, with_adapter, request(max_tokens=16))
    plain_again, _ = run(cache, base(tiny_llama), request(max_tokens=16))
    assert tuned != plain
    assert plain_again == plain  # the base answers as itself with the adapter loaded beside it
    assert len(cache.loaded) == 1 and cache.loaded[f"base:{tiny_llama}"].adapters == {"adapter_job_a"}

    # Unloading drops the adapter (the base stays), and loading it again gives the same answers.
    cache.unload(with_adapter)
    assert cache.loaded[f"base:{tiny_llama}"].adapters == set()
    assert run(cache, base(tiny_llama), request(max_tokens=16))[0] == plain
    cache.load(with_adapter, "infreq_test")
    assert run(cache, with_adapter, request(max_tokens=16))[0] == tuned


class FakeClient:
    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def report_inference(self, request_id: str, report: dict[str, Any]) -> bool:
        self.reports.append(report)
        return False


def test_the_worker_reports_text_then_done_and_a_failure_as_an_error(
    tmp_path: Path, tiny_llama: Path
) -> None:
    client = FakeClient()
    worker = ServingWorker(client, worker_id="w", device="cpu", workdir=tmp_path)  # type: ignore[arg-type]
    worker.answer(
        {
            "request_id": "inf_1",
            "request_token": "infreq_1",
            "target": base(tiny_llama),
            **request(max_tokens=5),
        }
    )
    *texts, last = client.reports
    assert texts and all(r["text"] for r in texts)
    assert last == {
        "request_token": "infreq_1",
        "worker_id": "w",
        "done": True,
        "finish_reason": "length",
        "usage": {"prompt_tokens": last["usage"]["prompt_tokens"], "completion_tokens": 5},
    }
    client.reports.clear()
    missing = {"name": "x", "base_source": None, "adapter": None, "model_files": None}
    worker.answer({"request_id": "inf_2", "request_token": "infreq_2", "target": missing, **request()})
    assert client.reports == [
        {
            "request_token": "infreq_2",
            "worker_id": "w",
            "done": True,
            "error": {"code": "invalid_config", "message": client.reports[0]["error"]["message"]},
        }
    ]
