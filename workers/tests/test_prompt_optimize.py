"""`prompt_optimize` jobs against a deterministic fake OpenAI-compatible endpoint on 127.0.0.1.

The fake task model answers a question correctly only when the system prompt contains MAGIC; the
proposer (the call carrying the proposer's system prompt) answers an instruction containing it, and
the judge grades YES exactly when the answer matches the reference. So the optimized prompt must beat
the original, and the scores are known exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_http import FakeHTTPServer

from tunery_worker.context import LocalJobContext
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import HANDLERS
from tunery_worker.jobs.prompt_optimize import JUDGE_SYSTEM, PROPOSER_SYSTEM

MAGIC = "Answer with the capital city only."
QUESTIONS = {
    "France": "Paris",
    "Japan": "Tokyo",
    "Italy": "Rome",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Chile": "Santiago",
}


class FakeOpenAI(FakeHTTPServer):
    """A deterministic chat model: proposer, judge and task answers by the system prompt it gets."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        super().__init__(self.respond)

    def respond(self, path: str, headers, body: dict) -> tuple[int, dict]:
        self.requests.append({"auth": headers.get("Authorization"), "body": body})
        message = {"role": "assistant", "content": self.reply(body)}
        return 200, {
            "choices": [{"index": 0, "message": message}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3},
        }

    @staticmethod
    def reply(body: dict) -> str:
        messages = body["messages"]
        system = messages[0]["content"] if messages[0]["role"] == "system" else ""
        user = messages[-1]["content"]
        if system == PROPOSER_SYSTEM:
            return f"You are a geography assistant. {MAGIC}"
        if system == JUDGE_SYSTEM:
            reference = user.split("Reference answer:\n")[1].split("\n")[0]
            answer = user.split("Answer to grade:\n")[1]
            return "YES" if answer.strip() == reference else "NO"
        country = user.rsplit(" ", 1)[-1].rstrip("?")
        return QUESTIONS[country] if MAGIC in system else f"The capital of {country} is {QUESTIONS[country]}."


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setenv("TUNERY_TEACHER_ALLOWED_HOSTS", "127.0.0.1")
    with FakeOpenAI() as server:
        yield server


def make_ctx(tmp_path: Path, spec: dict, records: list[dict] | None = None) -> LocalJobContext:
    dataset = tmp_path / "dataset.jsonl"
    if records is None:
        records = [
            {
                "messages": [
                    {"role": "system", "content": "You are helpful."},
                    {"role": "user", "content": f"What is the capital of {country}?"},
                    {"role": "assistant", "content": capital},
                ]
            }
            for country, capital in QUESTIONS.items()
        ]
    dataset.write_text("".join(json.dumps(r) + "\n" for r in records))
    workdir = tmp_path / "job"
    workdir.mkdir()
    return LocalJobContext(
        job_id="job_po", job_type="prompt_optimize", spec=spec, workdir=workdir, inputs={"dataset": dataset}
    )


def spec_for(server: FakeOpenAI, **overrides) -> dict:
    teacher = {
        "provider": "openai",
        "model": "teacher-x",
        "base_url": server.base_url,
        "api_key": "sk-secret",
    }
    return {"teacher": teacher, "iterations": 2, "candidates_per_iteration": 1, **overrides}


@pytest.mark.parametrize("metric", ["exact_match", "llm_judge"])
def test_the_optimized_prompt_beats_the_original(tmp_path, fake, metric):
    ctx = make_ctx(tmp_path, spec_for(fake, metric=metric))
    result = HANDLERS["prompt_optimize"](ctx)
    assert result["original_prompt"] == "You are helpful."
    assert result["original_score"] == 0.0
    assert MAGIC in result["optimized_prompt"]
    assert result["optimized_score"] == 1.0
    assert result["improvement"] == 1.0
    assert result["held_out_examples"] == 3 and result["feedback_examples"] == 3
    # one eval point per iteration after the original's, the best score so far
    assert [(p["step"], p["score"]) for p in ctx.metrics] == [(0, 0.0), (1, 1.0), (2, 1.0)]
    candidates = [e["payload"] for e in ctx.events if e["kind"] == "prompt_candidate"]
    assert [(c["iteration"], c["score"], c["kept"]) for c in candidates] == [(1, 1.0, True), (2, 1.0, False)]
    assert result["meters"]["teacher_requests"] == len(fake.requests)
    # the key authenticates every call and is written nowhere
    assert {r["auth"] for r in fake.requests} == {"Bearer sk-secret"}
    assert "sk-secret" not in json.dumps(result) + json.dumps(ctx.logs) + json.dumps(ctx.events)


def test_prompt_completion_records_and_an_explicit_initial_prompt(tmp_path, fake):
    records = [{"prompt": f"What is the capital of {c}?", "completion": a} for c, a in QUESTIONS.items()]
    ctx = make_ctx(tmp_path, spec_for(fake, initial_prompt=MAGIC, task_model="small"), records)
    result = HANDLERS["prompt_optimize"](ctx)
    # already perfect: no proposal is kept
    assert result["optimized_prompt"] == MAGIC and result["original_score"] == 1.0
    task_calls = [r["body"] for r in fake.requests if r["body"]["messages"][0]["content"] == MAGIC]
    assert task_calls and {b["model"] for b in task_calls} == {"small"}


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"teacher": {"provider": "openai"}}, "teacher.model"),
        ({"metric": "bleu"}, "metric"),
        ({"iterations": 0}, "iterations"),
        ({"teacher": {"model": "m", "base_url": "ftp://x"}}, "teacher.base_url"),
    ],
)
def test_bad_configs_are_refused(tmp_path, fake, overrides, param):
    with pytest.raises(InvalidConfig) as err:
        HANDLERS["prompt_optimize"](make_ctx(tmp_path, {**spec_for(fake), **overrides}))
    assert err.value.param == param


def test_records_without_an_answer_are_refused(tmp_path, fake):
    ctx = make_ctx(tmp_path, spec_for(fake), [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    with pytest.raises(InvalidDataset):
        HANDLERS["prompt_optimize"](ctx)
