"""`distill` jobs against a fake OpenAI-compatible teacher (an HTTP server on 127.0.0.1) and a local one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fake_http import FakeHTTPServer
from gguf import GGUFReader
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tunery_worker.context import JobStopped, LocalJobContext
from tunery_worker.data import collate, tokenize_record
from tunery_worker.errors import InvalidConfig, InvalidDataset
from tunery_worker.jobs import HANDLERS
from tunery_worker.jobs import distill as distill_module
from tunery_worker.jobs.distill import TeacherError, bond_loss, curate
from tunery_worker.modeling import load_model_and_tokenizer
from tunery_worker.text_metrics import distinct_bigram_ratio

# (content, mean token log-prob, finish_reason) of choice i. Choice 2 has the highest log-prob but
# was cut off, so curation must rank it last: best is choice 0, worst choice 2.
CANDIDATES = [
    ("The answer is Paris.", -0.2, "stop"),
    ("Paris Paris Paris Paris Paris Paris", -1.5, "stop"),
    ("It is", -0.1, "length"),
]
PROMPTS = ["What is the capital of France?", "Name a day of the week.", "How many legs does a spider have?"]


class FakeOpenAI(FakeHTTPServer):
    """A chat-completions endpoint. `minimal=True` mimics a server that ignores `n` and rejects `logprobs`."""

    def __init__(self, minimal: bool = False, status: int = 200) -> None:
        self.minimal, self.status = minimal, status
        self.requests: list[dict] = []
        super().__init__(self.respond)

    def respond(self, path: str, headers, body: dict) -> tuple[int, dict]:
        self.requests.append({"path": path, "auth": headers.get("Authorization"), "body": body})
        if self.status != 200:
            return self.status, {"error": {"message": "nope"}}
        if self.minimal and body.get("logprobs"):
            return 400, {"error": {"message": "logprobs is not supported"}}
        n = 1 if self.minimal else body["n"]
        # Successive requests for one prompt get successive candidates.
        answered = [r for r in self.requests if r["body"]["messages"] == body["messages"]]
        offset = sum(1 for r in answered if not r["body"].get("logprobs")) - 1
        choices = [self.choice(i if not self.minimal else offset + i, body) for i in range(n)]
        completion_tokens = sum(len(CANDIDATES[i % 3][0].split()) for i in range(n))
        usage = {"prompt_tokens": 7, "completion_tokens": completion_tokens}
        return 200, {"id": "cmpl", "object": "chat.completion", "choices": choices, "usage": usage}

    def choice(self, i: int, body: dict) -> dict:
        content, logprob, finish = CANDIDATES[i % 3]
        choice = {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": finish}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": w, "logprob": logprob} for w in content.split()]}
        return choice


def make_ctx(tmp_path: Path, student: Path, spec: dict, name: str = "job", **kwargs) -> LocalJobContext:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    workdir = tmp_path / name
    workdir.mkdir()
    return LocalJobContext(
        job_id=f"job_{name}",
        job_type="distill",
        spec={"base_model": {"name": "student", "source": str(student)}, **spec},
        workdir=workdir,
        inputs={"prompts": prompts},
        **kwargs,
    )


def openai_spec(server: FakeOpenAI, **overrides) -> dict:
    spec = {
        "teacher": {
            "provider": "openai",
            "model": "teacher-x",
            "base_url": server.base_url,
            "api_key": "sk-test",
        },
        "n_samples": 3,
        "temperature": 0.7,
        "max_new_tokens": 16,
        "training_steps": 4,
        "batch_size": 2,
        "learning_rate": 5e-3,
        "lora_rank": 4,
        "save_steps": 2,
        "output_name": "student-v1",
    }
    return {**spec, **overrides}


def unique(phases: list[str]) -> list[str]:
    return [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]


def test_openai_teacher_end_to_end_with_gguf(tmp_path, tiny_llama):
    with FakeOpenAI() as server:
        spec = openai_spec(server, export_gguf=True, quantization_types=["q8_0", "f16"])
        ctx = make_ctx(tmp_path, tiny_llama, spec)
        result = HANDLERS["distill"](ctx)

    assert unique(ctx.phases) == ["initializing", "data_generation", "curation", "training", "export"]
    assert len(server.requests) == 3  # one request per prompt: the endpoint honours n
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["body"]["model"] == "teacher-x" and request["body"]["n"] == 3
    assert request["body"]["temperature"] == 0.7 and request["body"]["max_tokens"] == 16
    assert request["body"]["logprobs"] is True

    assert result["samples_generated"] == 9 and result["prompts_used"] == 3 and result["pairs_kept"] == 3
    assert result["curation_score"] == "teacher_logprob"
    assert result["teacher_prompt_tokens"] == 21 and result["teacher_completion_tokens"] == 3 * 12
    assert result["teacher_tokens"] == 57 and result["teacher_requests"] == 3
    assert result["steps"] == 4 and math.isfinite(result["loss_final"])
    assert set(result["loss_components_final"]) == {"distill", "preference", "kl"}
    assert result["adapter"]["name"] == "student-v1" and result["adapter"]["size_bytes"] > 0
    assert [m["step"] for m in ctx.metrics] == [1, 2, 3, 4]

    pairs = [json.loads(line) for line in ctx.outputs["curated_pairs.jsonl"].read_text().splitlines()]
    assert all(p["best"]["text"] == "The answer is Paris." and p["worst"]["text"] == "It is" for p in pairs)
    config_text = ctx.outputs["train_config.json"].read_text()
    assert "sk-test" not in config_text and json.loads(config_text)["bond_beta"] == 0.5
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(ctx.outputs)
    assert "README.md" not in ctx.outputs

    # The GGUF files hold the merged student: compare with base + adapter merged by peft.
    assert set(result["gguf"]) == {"q8_0", "f16"}
    reader = GGUFReader(ctx.outputs["model-q8_0.gguf"])
    assert reader.get_field("general.architecture").contents() == "llama"
    assert reader.get_field("general.name").contents() == "student-v1"
    base, tokenizer = load_model_and_tokenizer(tiny_llama)
    merged = PeftModel.from_pretrained(
        base, ctx.outputs["adapter_model.safetensors"].parent
    ).merge_and_unload()
    # On its own in a directory: beside adapter_config.json, transformers would load the adapter's base.
    gguf_dir = tmp_path / "gguf-only"
    gguf_dir.mkdir()
    shutil.copyfile(ctx.outputs["model-f16.gguf"], gguf_dir / "model-f16.gguf")
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="model-f16.gguf")
    ids = tokenizer("The answer is Paris.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected, got = merged(ids).logits, from_gguf(ids).logits
    assert ((got - expected).pow(2).mean() / expected.pow(2).mean()).sqrt() < 2e-3
    # Training changed the student: the adapter is not a no-op.
    with torch.no_grad():
        assert not torch.allclose(expected, load_model_and_tokenizer(tiny_llama)[0](ids).logits)


def test_an_endpoint_without_n_or_logprobs_still_works(tmp_path, tiny_llama, monkeypatch):
    with FakeOpenAI(minimal=True) as server:
        ctx = make_ctx(tmp_path, tiny_llama, openai_spec(server, training_steps=1, n_samples=2))
        result = HANDLERS["distill"](ctx)
    # Per prompt: one refused request (logprobs), then one request per candidate.
    assert len(server.requests) == 1 + 3 * 2
    assert all("logprobs" not in r["body"] for r in server.requests[1:])
    assert result["samples_generated"] == 6
    assert result["curation_score"] == "distinct_bigrams"
    # Choice 1 (a loop) loses to choice 0 on distinct bigrams.
    pairs = [json.loads(line) for line in ctx.outputs["curated_pairs.jsonl"].read_text().splitlines()]
    assert pairs[0]["best"]["text"] == "The answer is Paris." and pairs[0]["worst"]["text"].startswith(
        "Paris Paris"
    )


def test_local_teacher(tmp_path, tiny_llama, tiny_qwen2):
    spec = {
        "teacher": {"provider": "local", "model": str(tiny_qwen2)},
        "n_samples": 2,
        "max_new_tokens": 6,
        "training_steps": 2,
        "lora_rank": 2,
        "num_prompts": 2,
    }
    ctx = make_ctx(tmp_path, tiny_llama, spec)
    result = HANDLERS["distill"](ctx)
    assert result["prompts_total"] == 2 and result["samples_generated"] == 4
    assert result["curation_score"] == "teacher_logprob"
    assert result["teacher_requests"] == 2 and 0 < result["teacher_completion_tokens"] <= 2 * 2 * 6
    assert result["teacher_prompt_tokens"] > 0 and result["gpu_seconds"] > 0


def test_a_local_teacher_at_temperature_0_answers_one_greedy_candidate(tmp_path, tiny_llama, tiny_qwen2):
    # generate refuses num_return_sequences > 1 without sampling: this crashed and was retried.
    spec = {
        "teacher": {"provider": "local", "model": str(tiny_qwen2)},
        "n_samples": 3,
        "temperature": 0,
        "max_new_tokens": 6,
        "training_steps": 1,
        "lora_rank": 2,
        "num_prompts": 2,
    }
    result = HANDLERS["distill"](make_ctx(tmp_path, tiny_llama, spec))
    # Greedy decoding has one answer per prompt, so no preference pair can come of it.
    assert result["samples_generated"] == 2 and result["teacher_requests"] == 2
    assert result["pairs_kept"] == 0 and result["steps"] == 1


def test_resume_continues_training_without_asking_the_teacher_again(tmp_path, tiny_llama):
    with FakeOpenAI() as server:
        full = make_ctx(tmp_path, tiny_llama, openai_spec(server), name="full")
        full_result = HANDLERS["distill"](full)
        requests_for_full_run = len(server.requests)

        # 3 checks during generation, then one per step: the 7th (start of step 4) stops the job.
        interrupted = make_ctx(tmp_path, tiny_llama, openai_spec(server), name="cut", stop_after_checks=6)
        with pytest.raises(JobStopped):
            HANDLERS["distill"](interrupted)
        assert sorted(interrupted.checkpoints) == ["checkpoint-2", "generation-3"]
        requests_before_resume = len(server.requests)
        _, checkpoint = interrupted.checkpoints["checkpoint-2"]
        resumed = make_ctx(
            tmp_path, tiny_llama, openai_spec(server), name="resumed", resume_checkpoint=checkpoint
        )
        resumed_result = HANDLERS["distill"](resumed)

    assert requests_before_resume == 2 * requests_for_full_run
    assert len(server.requests) == requests_before_resume  # the resumed attempt paid nothing
    assert [m["step"] for m in resumed.metrics] == [3, 4]
    assert resumed_result["teacher_tokens"] == full_result["teacher_tokens"]
    assert resumed_result["loss_final"] == pytest.approx(full_result["loss_final"], rel=1e-4)


def test_a_stopped_job_keeps_the_last_checkpoints_adapter_as_outputs(tmp_path, tiny_llama):
    with FakeOpenAI() as server:
        # stopped at the start of step 4, after checkpoint-2 (save_steps 2) and step 3
        ctx = make_ctx(tmp_path, tiny_llama, openai_spec(server), stop_after_checks=6)
        with pytest.raises(JobStopped):
            HANDLERS["distill"](ctx)
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json"} <= set(ctx.outputs)
    assert not any(name.endswith(".gguf") or name == "train_config.json" for name in ctx.outputs)
    published = load_file(str(ctx.outputs["adapter_model.safetensors"]))
    _, path = ctx.checkpoints["checkpoint-2"]
    at_checkpoint = torch.load(path, weights_only=False)["training"]["adapter"]
    assert len(published) == len(at_checkpoint) > 0
    for key, tensor in at_checkpoint.items():
        # peft saves without the adapter's name ("default")
        assert torch.equal(published[key.replace(".default", "")], tensor.cpu()), key
    # step 3 trained on after the checkpoint: what is kept is the checkpoint's adapter, not step 3's
    assert [m["step"] for m in ctx.metrics] == [1, 2, 3]


def test_unsupported_gguf_type_fails_before_the_teacher_is_paid(tmp_path, tiny_llama):
    with FakeOpenAI() as server:
        spec = openai_spec(server, export_gguf=True, quantization_types=["q8_0", "iq4_xs"])
        ctx = make_ctx(tmp_path, tiny_llama, spec)
        with pytest.raises(InvalidConfig) as err:
            HANDLERS["distill"](ctx)
    assert err.value.param == "quantization_types" and "iq4_xs" in err.value.message
    assert server.requests == [] and ctx.phases == []


def test_teacher_failures(tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setattr(distill_module, "TEACHER_BACKOFF_S", 0.0)
    with FakeOpenAI(status=503) as server:
        with pytest.raises(TeacherError) as err:
            HANDLERS["distill"](make_ctx(tmp_path, tiny_llama, openai_spec(server), name="busy"))
        assert len(server.requests) == distill_module.TEACHER_ATTEMPTS
    assert err.value.retryable and "503" in err.value.message
    with FakeOpenAI(status=401) as server:
        with pytest.raises(InvalidConfig) as err:
            HANDLERS["distill"](make_ctx(tmp_path, tiny_llama, openai_spec(server), name="denied"))
        assert len(server.requests) == 1  # a refused key is not retried
    assert not err.value.retryable


def test_curation_ranks_complete_answers_first_and_skips_ties_and_empties():
    def candidate(text, logprob=None, finish="stop"):
        return {"text": text, "mean_logprob": logprob, "finish_reason": finish, "tokens": 1}

    samples = [
        {
            "prompt": "a",
            "candidates": [candidate("good", -0.5), candidate("cut", -0.1, "length"), candidate("ok", -0.9)],
        },
        {"prompt": "b", "candidates": [candidate("same", -1.0), candidate("same", -1.0)]},
        {"prompt": "c", "candidates": [candidate("  "), candidate("")]},
    ]
    curated, method = curate(samples)
    assert method == "teacher_logprob"
    assert [c["prompt"] for c in curated] == ["a", "b"]  # nothing usable for c
    assert curated[0]["best"]["text"] == "good" and curated[0]["worst"]["text"] == "cut"
    assert curated[1]["worst"] is None  # a tie carries no preference

    samples[0]["candidates"][0]["mean_logprob"] = None  # one unknown score: the heuristic for all
    curated, method = curate(samples)
    assert method == "distinct_bigrams"
    assert distinct_bigram_ratio("a b a b a b") == pytest.approx(2 / 5)
    assert distinct_bigram_ratio("one two three") == 1.0


def test_bond_loss_starts_at_log2_and_zero_kl_then_learns_the_preference(tiny_llama):
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(tiny_llama)
    student = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )

    def encode(prompt, completion):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenize_record({"messages": messages}, "chat", tokenizer, 128)

    batch = [
        {
            "best": encode("Capital of France?", "Paris."),
            "worst": encode("Capital of France?", "Rome Rome Rome."),
        },
        {"best": encode("Legs of a spider?", "Eight."), "worst": None},
    ]
    loss, parts = bond_loss(student, batch, tokenizer.pad_token_id, beta=1.0, gamma=0.1, device="cpu")
    assert parts["preference"] == pytest.approx(math.log(2), abs=1e-6)  # zero adapter: policy = reference
    assert parts["kl"] == pytest.approx(0.0, abs=1e-7)
    assert loss.item() == pytest.approx(parts["distill"] + math.log(2), abs=1e-5)

    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(15):
        loss, _ = bond_loss(student, batch, tokenizer.pad_token_id, beta=1.0, gamma=0.1, device="cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    _, trained = bond_loss(student, batch, tokenizer.pad_token_id, beta=1.0, gamma=0.1, device="cpu")
    assert trained["preference"] < math.log(2) - 0.05  # best now beats worst relative to the reference
    assert trained["distill"] < parts["distill"]
    assert trained["kl"] > 0


@pytest.mark.parametrize(
    "spec,param",
    [
        ({"teacher": {"provider": "anthropic", "model": "x"}}, "teacher.provider"),
        ({"teacher": {"provider": "openai"}}, "teacher.model"),
        ({"teacher": {"provider": "openai", "model": "x", "base_url": "ftp://x"}}, "teacher.base_url"),
        ({"teacher": {"provider": "local", "model": "x"}, "n_samples": 0}, "n_samples"),
        ({"teacher": {"provider": "local", "model": "x"}, "bond_beta": -1}, "bond_beta"),
    ],
)
def test_bad_configs_are_refused(tmp_path, tiny_llama, spec, param):
    with pytest.raises(InvalidConfig) as err:
        HANDLERS["distill"](make_ctx(tmp_path, tiny_llama, spec))
    assert err.value.param == param


def test_prompts_that_leave_no_room_for_the_answer_are_dropped(tmp_path, tiny_llama):
    with FakeOpenAI() as server:
        ctx = make_ctx(tmp_path, tiny_llama, openai_spec(server, max_seq_length=8))
        with pytest.raises(InvalidDataset, match="max_seq_length"):
            HANDLERS["distill"](ctx)


def plain_bond_loss(student, batch, pad_id, beta, gamma):
    """The objective computed the plain way, from full-vocabulary fp32 logits (as it was before)."""
    rows = [i for i, e in enumerate(batch) if e["worst"] is not None]

    def forward(examples):
        inputs = collate(examples, pad_id)
        policy = student(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).logits.float()
        with torch.no_grad(), student.disable_adapter():
            reference = student(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        return policy, reference.float(), inputs["labels"]

    def token_logprobs(logits, labels):
        targets = labels[:, 1:]
        mask = targets != -100
        logp = (
            torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        )
        return logp * mask, mask

    def kl_sum(policy_logits, reference_logits, mask):
        policy = torch.log_softmax(policy_logits[:, :-1], -1)
        reference = torch.log_softmax(reference_logits[:, :-1], -1)
        return ((policy.exp() * (policy - reference)).sum(-1) * mask).sum(), mask.sum()

    def mean_per_row(values, mask):
        return values.sum(-1) / mask.sum(-1).clamp(min=1)

    policy_best, reference_best, labels_best = forward([e["best"] for e in batch])
    logp_best, mask_best = token_logprobs(policy_best, labels_best)
    distill = -(logp_best.sum() / mask_best.sum())
    kl, count = kl_sum(policy_best, reference_best, mask_best)
    policy_worst, reference_worst, labels_worst = forward([batch[i]["worst"] for i in rows])
    logp_worst, mask_worst = token_logprobs(policy_worst, labels_worst)
    ref_best, _ = token_logprobs(reference_best[rows], labels_best[rows])
    ref_worst, _ = token_logprobs(reference_worst, labels_worst)
    margin = mean_per_row(logp_best[rows] - ref_best, mask_best[rows]) - mean_per_row(
        logp_worst - ref_worst, mask_worst
    )
    worst_kl, worst_count = kl_sum(policy_worst, reference_worst, mask_worst)
    return distill - beta * F.logsigmoid(margin).mean() + gamma * (kl + worst_kl) / (count + worst_count)


def test_the_chunked_bond_loss_equals_the_plain_one_and_its_gradient(tiny_llama, monkeypatch):
    from tunery_worker import modeling

    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", 512 * 5)  # several chunks per batch
    torch.manual_seed(0)
    model, tokenizer = load_model_and_tokenizer(tiny_llama)
    student = get_peft_model(
        model,
        LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    for name, param in student.named_parameters():
        if "lora_B" in name:  # a trained adapter: policy and reference differ
            torch.nn.init.normal_(param, std=0.2)

    def encode(prompt, completion):
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return tokenize_record({"messages": messages}, "chat", tokenizer, 128)

    batch = [
        {"best": encode("Capital of France?", "Paris."), "worst": encode("Capital of France?", "Rome Rome.")},
        {"best": encode("Legs of a spider?", "Eight legs."), "worst": None},
        {"best": encode("Hi?", "Hello."), "worst": encode("Hi?", "No no no no no.")},
    ]
    grads = []
    for compute in (
        lambda: plain_bond_loss(student, batch, tokenizer.pad_token_id, 0.7, 0.3),
        lambda: bond_loss(student, batch, tokenizer.pad_token_id, beta=0.7, gamma=0.3, device="cpu")[0],
    ):
        student.zero_grad(set_to_none=True)
        loss = compute()
        loss.backward()
        grads.append(
            (
                float(loss.detach()),
                {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None},
            )
        )
    (plain, plain_grads), (chunked, chunked_grads) = grads
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
