"""`prompt_optimize` jobs: optimize the system prompt of an LLM task from recorded examples.

In the spirit of MIPRO/GEPA, without weights: the dataset (chat records as buildDataset writes them
from trajectories: an optional system message, the conversation, then the assistant's recorded answer)
is split into a feedback set and a held-out set. Each iteration takes the best instruction so far,
collects the feedback examples it gets wrong, asks the teacher model to rewrite the instruction given
those failures (`candidates_per_iteration` proposals), scores every proposal on the held-out set with
the metric, and keeps a proposal only when it scores strictly higher. The task model answering with a
candidate instruction is `task_model` (default: the teacher's model) on the teacher's endpoint.

Metrics: `exact_match` (answer equals the recorded one, ignoring case and surrounding whitespace) or
`llm_judge` (the teacher grades each answer against the recorded one, YES/NO).

Reports one eval metric point per iteration (`step` = iteration, `score` = best held-out score so far,
`eval_loss` = 1 − score) and one `prompt_candidate` event per proposal. The result is the optimized
prompt with its held-out score beside the original's; the teacher's API key is never written anywhere.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunery_worker import egress
from tunery_worker.context import JobContext
from tunery_worker.data import read_jsonl
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import spec_fields as f
from tunery_worker.jobs.distill import OPENAI_BASE_URL, OpenAITeacher, TeacherConfig

METRICS = ("exact_match", "llm_judge")
MAX_FAILURES_SHOWN = 5  # failures quoted to the proposer per iteration: enough signal, bounded prompt

PROPOSER_SYSTEM = (
    "You improve system prompts for a language-model task. Given the current instruction and examples "
    "it got wrong, write a better instruction. Answer with the new instruction only."
)
JUDGE_SYSTEM = (
    "You grade answers. Reply YES if the answer is correct given the reference answer, otherwise NO."
)


@dataclass
class PromptOptimizeConfig:
    teacher: TeacherConfig
    task_model: str  # the model answering with each candidate instruction (same endpoint)
    metric: str  # exact_match | llm_judge
    iterations: int  # proposal rounds
    candidates_per_iteration: int  # proposals per round
    eval_fraction: float  # share of examples held out for scoring
    max_examples: int  # cap on examples read
    initial_prompt: str | None  # the instruction to start from (default: the data's system prompt)
    temperature: float  # proposer sampling temperature
    max_new_tokens: int  # longest task answer
    seed: int  # split order

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> PromptOptimizeConfig:
        teacher = f.section(spec, "teacher")
        provider = f.get_str(teacher, "provider", "openai", choices=("openai",), where="teacher.")
        model = f.get_str(teacher, "model", "", where="teacher.")
        if not model:
            raise InvalidConfig("teacher.model is required", param="teacher.model")
        base_url = egress.check_teacher_url(f.get_str(teacher, "base_url", OPENAI_BASE_URL, where="teacher."))
        initial = spec.get("initial_prompt")
        if initial is not None and not isinstance(initial, str):
            raise InvalidConfig("initial_prompt must be a string", param="initial_prompt")
        return cls(
            teacher=TeacherConfig(
                provider=provider,
                model=model,
                base_url=base_url.rstrip("/"),
                api_key=teacher.get("api_key") or None,
                timeout_s=f.get_float(
                    teacher, "timeout_s", 120.0, minimum=1.0, maximum=3600.0, where="teacher."
                ),
            ),
            task_model=f.get_str(spec, "task_model", "") or model,
            metric=f.get_str(spec, "metric", "exact_match", choices=METRICS),
            iterations=f.get_int(spec, "iterations", 3, minimum=1, maximum=50),
            candidates_per_iteration=f.get_int(spec, "candidates_per_iteration", 2, minimum=1, maximum=16),
            eval_fraction=f.get_float(spec, "eval_fraction", 0.5, minimum=0.05, maximum=0.95),
            max_examples=f.get_int(spec, "max_examples", 200, minimum=2, maximum=10_000),
            initial_prompt=initial,
            temperature=f.get_float(spec, "temperature", 0.7, minimum=0.0, maximum=2.0),
            max_new_tokens=f.get_int(spec, "max_new_tokens", 256, minimum=1, maximum=4096),
            seed=f.get_int(spec, "seed", 0, minimum=0),
        )

    def public(self) -> dict[str, Any]:
        """The config as written to the result: everything but the API key."""
        data = asdict(self)
        data["teacher"].pop("api_key", None)
        return data


@dataclass
class Example:
    conversation: list[dict[str, str]]  # messages before the recorded answer, without the system one
    expected: str
    system: str | None


def run(ctx: JobContext) -> dict[str, Any]:
    config = PromptOptimizeConfig.from_spec(ctx.spec)
    ctx.set_phase("data_preparation")
    examples = _read_examples(ctx, config.max_examples)
    feedback, held_out = _split(examples, config.eval_fraction, config.seed)
    original = config.initial_prompt if config.initial_prompt is not None else _common_system(examples)
    teacher = OpenAITeacher(config.teacher)
    try:
        optimizer = _Optimizer(ctx, config, teacher)
        ctx.set_phase("evaluating", {"current_step": 0, "total_steps": config.iterations})
        original_score = optimizer.score(original, held_out)
        best, best_score = original, original_score
        ctx.metric({"step": 0, "phase": "eval", "score": best_score, "eval_loss": 1 - best_score})
        for iteration in range(1, config.iterations + 1):
            if ctx.should_stop():
                break
            failures = optimizer.failures(best, feedback)
            for index in range(config.candidates_per_iteration):
                candidate = optimizer.propose(best, failures)
                score = optimizer.score(candidate, held_out)
                kept = score > best_score
                ctx.event(
                    "prompt_candidate",
                    {"iteration": iteration, "candidate": index, "score": score, "kept": kept},
                )
                if kept:
                    best, best_score = candidate, score
            ctx.metric({"step": iteration, "phase": "eval", "score": best_score, "eval_loss": 1 - best_score})
            ctx.set_phase("evaluating", {"current_step": iteration, "total_steps": config.iterations})
            ctx.log(f"iteration {iteration}: best held-out {config.metric} {best_score:.3f}")
    finally:
        teacher.close()
    return {
        "optimized_prompt": best,
        "optimized_score": best_score,
        "original_prompt": original,
        "original_score": original_score,
        "improvement": best_score - original_score,
        "metric": config.metric,
        "held_out_examples": len(held_out),
        "feedback_examples": len(feedback),
        "meters": teacher.take_meters(),
        "config": config.public(),
    }


class _Optimizer:
    """The three kinds of model calls: task answers, instruction proposals, judge grades."""

    def __init__(self, ctx: JobContext, config: PromptOptimizeConfig, teacher: OpenAITeacher) -> None:
        self.ctx, self.config, self.teacher = ctx, config, teacher

    def _chat(self, model: str, messages: list[dict[str, str]], temperature: float) -> str:
        body = {
            "model": model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": self.config.max_new_tokens,
        }
        choices = self.teacher._post(body).get("choices") or [{}]
        return ((choices[0].get("message") or {}).get("content") or "").strip()

    def answer(self, instruction: str, example: Example) -> str:
        system = [{"role": "system", "content": instruction}] if instruction else []
        return self._chat(self.config.task_model, system + example.conversation, 0.0)

    def correct(self, example: Example, answer: str) -> bool:
        if self.config.metric == "exact_match":
            return answer.strip().lower() == example.expected.strip().lower()
        question = example.conversation[-1]["content"] if example.conversation else ""
        grade = self._chat(
            self.config.teacher.model,
            [
                {"role": "system", "content": JUDGE_SYSTEM},
                {
                    "role": "user",
                    "content": f"Question:\n{question}\n\nReference answer:\n{example.expected}\n\n"
                    f"Answer to grade:\n{answer}",
                },
            ],
            0.0,
        )
        return grade.upper().startswith("YES")

    def score(self, instruction: str, examples: list[Example]) -> float:
        hits = sum(self.correct(e, self.answer(instruction, e)) for e in examples)
        return hits / len(examples)

    def failures(self, instruction: str, examples: list[Example]) -> list[tuple[Example, str]]:
        wrong = []
        for example in examples:
            answer = self.answer(instruction, example)
            if not self.correct(example, answer):
                wrong.append((example, answer))
        return wrong[:MAX_FAILURES_SHOWN]

    def propose(self, instruction: str, failures: list[tuple[Example, str]]) -> str:
        shown = "\n\n".join(
            f"Input: {e.conversation[-1]['content'] if e.conversation else ''}\n"
            f"Model answer: {answer}\nExpected: {e.expected}"
            for e, answer in failures
        )
        request = (
            f"Current instruction:\n{instruction or '(none)'}\n\n"
            f"Examples it got wrong:\n{shown or '(none: make it more robust)'}\n\nNew instruction:"
        )
        proposal = self._chat(
            self.config.teacher.model,
            [{"role": "system", "content": PROPOSER_SYSTEM}, {"role": "user", "content": request}],
            self.config.temperature,
        )
        return proposal or instruction


def _read_examples(ctx: JobContext, limit: int) -> list[Example]:
    path = ctx.inputs.get("dataset")
    if path is None:
        raise InvalidConfig("a prompt_optimize job needs a dataset", param="dataset_id")
    try:
        records = read_jsonl(path)
    except ValueError as err:
        raise InvalidDataset(str(err), param="dataset_id") from None
    examples = [_example_of(record, Path(path).name) for record in records[:limit]]
    if len(examples) < 2:
        raise InvalidDataset("prompt optimization needs at least 2 examples", param="dataset_id")
    return examples


def _example_of(record: dict[str, Any], name: str) -> Example:
    """A chat record (its last message the recorded assistant answer) or a prompt/completion pair."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        *before, last = messages
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            system = next((m.get("content") for m in before if m.get("role") == "system"), None)
            conversation = [
                {"role": str(m.get("role")), "content": str(m.get("content") or "")}
                for m in before
                if m.get("role") != "system"
            ]
            return Example(conversation, last["content"], system if isinstance(system, str) else None)
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return Example([{"role": "user", "content": record["prompt"]}], record["completion"], None)
    raise InvalidDataset(
        f'{name} line {record.get("__line__")}: expected "messages" ending with an assistant answer, '
        'or "prompt" and "completion"',
        param="dataset_id",
    )


def _split(examples: list[Example], eval_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(examples)
    random.Random(seed).shuffle(order)
    held = min(len(order) - 1, max(1, round(len(order) * eval_fraction)))
    return order[held:], order[:held]


def _common_system(examples: list[Example]) -> str:
    """The instruction the recorded calls used most (empty when they had none)."""
    counts = Counter(e.system for e in examples if e.system)
    return counts.most_common(1)[0][0] if counts else ""
