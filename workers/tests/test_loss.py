"""The fused, chunked causal-LM loss equals the plain one, in value and in every gradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from tunery_worker import modeling
from tunery_worker.modeling import causal_lm_loss_sum, token_loss_sum


def batch(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (3, 24), generator=generator)
    labels = input_ids.clone()
    labels[0, :9] = -100  # a masked prompt
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 17:] = 0  # right padding
    labels[2, 17:] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def plain_and_fused(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):  # type: ignore[no-untyped-def]
    """(loss, count, grads) the plain way (full logits), then the fused way."""
    results = []
    for fused in (False, True):
        model.zero_grad(set_to_none=True)
        if fused:
            loss, count = causal_lm_loss_sum(
                model, inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"]
            )
        else:
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
            loss, count = token_loss_sum(logits, inputs["labels"])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), count, grads))
    return results


def assert_same_gradient(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal up to float32 summation order. The absolute tolerance scales with the tensor's largest
    entry: an embedding's gradient sums many tokens' contributions, so an entry that cancels to
    near zero keeps an error of ~1e-7 of the largest one, and its size differs between CPUs' kernels."""
    scale = max(1.0, float(expected.abs().max()))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 7 rows of the 512-token vocabulary per chunk: several chunks, the last one partial.
    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", 512 * 7)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_loss_equals_plain_loss_and_gradients_full_model(
    arch: str, small_chunks: None, tiny_llama: Path, tiny_qwen2: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama if arch == "llama" else tiny_qwen2)
    (plain, plain_n, plain_grads), (fused, fused_n, fused_grads) = plain_and_fused(
        model, batch(model.config.vocab_size)
    )
    assert fused_n == plain_n == (23 - 8) + 23 + 16  # labelled next-token positions per row
    assert fused == pytest.approx(plain, rel=1e-5)
    # Every parameter, the LM head's included, gets the same gradient.
    assert fused_grads.keys() == plain_grads.keys()
    assert "lm_head.weight" in fused_grads
    for name, grad in plain_grads.items():
        assert_same_gradient(fused_grads[name], grad, name)


def test_fused_loss_equals_plain_loss_with_lora(small_chunks: None, tiny_llama: Path) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, param in model.named_parameters():  # non-zero B, so the adapter changes the loss
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    (plain, _, plain_grads), (fused, _, fused_grads) = plain_and_fused(
        model, batch(base.config.vocab_size, 1)
    )
    assert fused == pytest.approx(plain, rel=1e-5)
    assert plain_grads.keys() == fused_grads.keys() and all("lora_" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        assert_same_gradient(fused_grads[name], grad, name)


def test_a_lora_wrapped_head_goes_through_checkpointed_chunks(small_chunks: None, tiny_llama: Path) -> None:
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    (plain, _, plain_grads), (fused, _, fused_grads) = plain_and_fused(
        model, batch(base.config.vocab_size, 2)
    )
    assert fused == pytest.approx(plain, rel=1e-5)
    assert any("lm_head" in n for n in fused_grads)
    for name, grad in plain_grads.items():
        assert_same_gradient(fused_grads[name], grad, name)


def test_fused_loss_under_bf16_autocast_matches_plain(tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inputs = batch(model.config.vocab_size, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (plain, _, plain_grads), (fused, _, fused_grads) = plain_and_fused(model, inputs)
    assert fused == pytest.approx(plain, rel=2e-2)
    for name, grad in plain_grads.items():
        assert fused_grads[name].dtype == grad.dtype == torch.float32  # master weights stay fp32
        torch.testing.assert_close(fused_grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_the_full_logits_are_never_materialised(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    vocab = model.config.vocab_size
    monkeypatch.setattr(modeling, "LOSS_CHUNK_ELEMENTS", vocab * 5)
    widest: list[int] = []
    original = torch.nn.functional.linear

    def spy(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if weight.shape[0] == vocab:
            widest.append(x.reshape(-1, x.shape[-1]).shape[0])
        return original(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", spy)
    inputs = batch(vocab)
    loss, _ = causal_lm_loss_sum(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"])
    loss.backward()
    assert widest and max(widest) <= 5  # the head saw 5 rows at a time, never the 72 positions


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_packed_and_unpacked_losses_agree(arch: str, tiny_llama: Path, tiny_qwen2: Path) -> None:
    from tunery_worker.data import Example, collate, pack

    model = AutoModelForCausalLM.from_pretrained(tiny_llama if arch == "llama" else tiny_qwen2)
    generator = torch.Generator().manual_seed(4)
    examples = []
    for length, prompt in [(20, 6), (7, 3), (12, 0), (5, 2), (9, 4)]:
        ids = torch.randint(0, model.config.vocab_size, (length,), generator=generator).tolist()
        examples.append(Example(input_ids=ids, labels=[-100] * prompt + ids[prompt:]))
    packed = pack(examples, pad_token_id=0)
    # 20 | 12 + 7 | 9 + 5 (+ 6 padding): three rows of 20 instead of five.
    assert packed["input_ids"].shape == (3, 20) and "attention_mask" not in packed

    results = []
    for inputs in (collate(examples, pad_token_id=0), packed):
        model.zero_grad(set_to_none=True)
        loss, count = causal_lm_loss_sum(
            model,
            inputs["input_ids"],
            inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            position_ids=inputs.get("position_ids"),
        )
        loss.backward()
        results.append(
            (float(loss.detach()), count, {n: p.grad.clone() for n, p in model.named_parameters()})
        )
    (unpacked, unpacked_n, unpacked_grads), (packed_loss, packed_n, packed_grads) = results
    assert packed_n == unpacked_n == sum(e.trained_tokens for e in examples)
    assert packed_loss == pytest.approx(unpacked, rel=1e-5)
    for name, grad in unpacked_grads.items():
        assert_same_gradient(packed_grads[name], grad, name)


def test_fused_lora_adds_match_peft_in_outputs_and_gradients(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunery_worker.modeling import fuse_lora_adds

    addmm_calls: list[int] = []
    addmm = torch.addmm
    monkeypatch.setattr(torch, "addmm", lambda *a, **k: addmm_calls.append(1) or addmm(*a, **k))
    inputs = batch(512, 5)
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        # Dropout > 0: the fused path must draw the same masks in the same order as peft's.
        model = get_peft_model(
            base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.1)
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.1)
        if fused:
            assert fuse_lora_adds(model) == 2 * 7  # every adapted projection of both layers
        torch.manual_seed(1)
        loss, _ = causal_lm_loss_sum(model, inputs["input_ids"], inputs["labels"], inputs["attention_mask"])
        loss.backward()
        with torch.no_grad(), model.disable_adapter():  # peft's own path: the adapter switched off
            reference = model(input_ids=inputs["input_ids"]).logits
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((float(loss.detach()), grads, reference))
    (plain, plain_grads, plain_reference), (fused_loss, fused_grads, fused_reference) = results
    assert len(addmm_calls) == 2 * 7  # the fused path ran once per adapted layer; never with adapters off
    assert fused_loss == pytest.approx(plain, rel=1e-5)
    torch.testing.assert_close(fused_reference, plain_reference)
    assert plain_grads.keys() == fused_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert_same_gradient(fused_grads[name], grad, name)


def test_fused_loss_when_every_position_is_labelled(small_chunks: None, tiny_llama: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(6))
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    (plain, plain_n, plain_grads), (fused, fused_n, fused_grads) = plain_and_fused(model, inputs)
    assert fused_n == plain_n == 2 * 15 and fused == pytest.approx(plain, rel=1e-5)
    for name, grad in plain_grads.items():
        assert_same_gradient(fused_grads[name], grad, name)


def test_rows_of_one_full_example_need_no_position_ids() -> None:
    from tunery_worker.data import Example, pack

    full = [Example(input_ids=[5, 6, 7], labels=[5, 6, 7]), Example(input_ids=[8, 9, 10], labels=[8, 9, 10])]
    packed = pack(full, pad_token_id=0)
    assert set(packed) == {"input_ids", "labels"}  # the model's default positions are these
    assert packed["labels"].tolist() == [[-100, 6, 7], [-100, 9, 10]]
    assert "position_ids" in pack([*full, Example(input_ids=[1], labels=[1])], pad_token_id=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_loss_on_cuda_under_autocast_matches_plain(tiny_llama: Path) -> None:
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).cuda()
    inputs = {k: v.cuda() for k, v in batch(model.config.vocab_size, 7).items()}
    with torch.autocast("cuda", dtype=dtype):
        (plain, _, plain_grads), (fused, _, fused_grads) = plain_and_fused(model, inputs)
    assert fused == pytest.approx(plain, rel=2e-2)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=5e-2, atol=5e-3, msg=name)


def test_fused_kernels_and_compile_fall_back_cleanly_without_cuda(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from tunery_worker.modeling import apply_fused_kernels, compile_enabled

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert apply_fused_kernels(model, "cpu") is None  # liger's Triton kernels need a GPU
    if importlib.util.find_spec("liger_kernel") is None:
        assert apply_fused_kernels(model, "cuda") is None  # not installed: the plain modules run
    monkeypatch.delenv("TUNERY_TORCH_COMPILE", raising=False)
    assert not compile_enabled()  # opt-in
    monkeypatch.setenv("TUNERY_TORCH_COMPILE", "1")
    assert compile_enabled()
