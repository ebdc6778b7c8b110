"""Dataset reading, format detection, label masking, truncation, splitting and batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunery_worker import data
from tunery_worker.data import IGNORE_INDEX
from tunery_worker.modeling import load_tokenizer
from tunery_worker.tiny_model import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tokenizer(tiny_llama: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(tiny_llama)


def trained_text(tokenizer, example: data.Example) -> str:  # type: ignore[no-untyped-def]
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello you"},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Yes, again"},
]


def test_text_trains_every_token_and_ends_with_eos(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = data.tokenize_record({"text": "hello world"}, "text", tokenizer, 64)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_prompt_completion_masks_the_prompt(tokenizer) -> None:  # type: ignore[no-untyped-def]
    record = {"prompt": "Q: 2+2?", "completion": " 4"}
    example = data.tokenize_record(record, "prompt_completion", tokenizer, 64)
    prompt_len = len(tokenizer("Q: 2+2?")["input_ids"])
    assert example.labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert example.labels[prompt_len:] == example.input_ids[prompt_len:]
    assert trained_text(tokenizer, example) == " 4" + tokenizer.eos_token

    everything = data.tokenize_record(record, "prompt_completion", tokenizer, 64, train_on_inputs=True)
    assert everything.labels == everything.input_ids == example.input_ids


def test_prompt_completion_is_tokenized_joined_byte_level_bpe(tokenizer) -> None:  # type: ignore[no-untyped-def]
    # Byte-level BPE: apart, "1" and "00" split the number as " 1" "0" "0"; joined it is " 10" "0".
    record = {"prompt": "Count: 1", "completion": "00 items"}
    example = data.tokenize_record(record, "prompt_completion", tokenizer, 64)
    joined = tokenizer("Count: 100 items")["input_ids"]
    assert example.input_ids == [*joined, tokenizer.eos_token_id]
    apart = tokenizer("Count: 1")["input_ids"] + tokenizer("00 items", add_special_tokens=False)["input_ids"]
    assert apart != joined  # the case this guards against is real for this tokenizer
    # Training starts at the token straddling the boundary (" 10"), which holds completion text.
    first = example.labels.index(next(t for t in example.labels if t != IGNORE_INDEX))
    assert tokenizer.convert_ids_to_tokens(example.input_ids[first]) == "Ġ" + "10"
    assert example.labels[first:] == example.input_ids[first:]
    assert set(example.labels[:first]) == {IGNORE_INDEX}


def test_prompt_completion_has_no_spurious_sentencepiece_prefix() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tunery_worker.tiny_model import _CORPUS

    # A Llama-2/Mistral-style tokenizer: SentencePiece's "▁" marks a word start, prepended to the text.
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    raw.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    raw.train_from_iterator(_CORPUS * 4, trainer)
    sp = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")

    example = data.tokenize_record({"prompt": "Answer:", "completion": "Paris"}, "prompt_completion", sp, 64)
    assert example.input_ids == [*sp("Answer:Paris")["input_ids"], sp.eos_token_id]
    trained = sp.convert_ids_to_tokens([t for t in example.labels if t != IGNORE_INDEX])
    assert trained[0] != "▁" and not trained[0].startswith("▁")  # no "▁" the joined text lacks
    assert sp.decode([t for t in example.labels if t != IGNORE_INDEX], skip_special_tokens=True) == "Paris"


def test_chat_trains_only_assistant_turns(tokenizer) -> None:  # type: ignore[no-untyped-def]
    example = data.tokenize_record({"messages": CHAT}, "chat", tokenizer, 256)
    rendered = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert tokenizer.decode(example.input_ids) == rendered
    assert trained_text(tokenizer, example) == "Hello you<|im_end|>\nYes, again<|im_end|>\n"

    everything = data.tokenize_record({"messages": CHAT}, "chat", tokenizer, 256, train_on_inputs=True)
    assert everything.labels == everything.input_ids


def test_chat_template_without_prefix_property_uses_generation_markers(tokenizer) -> None:  # type: ignore[no-untyped-def]
    # A template that numbers turns from the end renders a prefix differently from the whole.
    odd = CHAT_TEMPLATE.replace(
        "'<|im_start|>' + message['role']", "'<|im_start|>' + message['role'] + (loop.revindex | string)"
    )
    tokenizer.chat_template = odd
    try:
        example = data.tokenize_record({"messages": CHAT}, "chat", tokenizer, 256)
        assert trained_text(tokenizer, example) == "Hello you<|im_end|>Yes, again<|im_end|>"
        tokenizer.chat_template = odd.replace("{% generation %}", "").replace("{% endgeneration %}", "")
        with pytest.raises(ValueError, match="assistant tokens cannot be located"):
            data.tokenize_record({"messages": CHAT}, "chat", tokenizer, 256)
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE


STRICT_TEMPLATE = (  # the check many hub templates make, through transformers' raise_exception
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


def test_a_conversation_the_chat_template_rejects_is_a_dataset_error(tokenizer) -> None:  # type: ignore[no-untyped-def]
    # A ValueError naming the line (→ invalid_dataset, not retried), not jinja2's TemplateError.
    tokenizer.chat_template = STRICT_TEMPLATE
    try:
        good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
        bad = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "assistant", "content": "x"}]}
        assert data.build_dataset([{**good, "__line__": 1}], "chat", tokenizer, 64).examples
        with pytest.raises(ValueError, match="line 2: .*chat template rejects.*roles must alternate"):
            data.build_dataset([{**good, "__line__": 1}, {**bad, "__line__": 2}], "chat", tokenizer, 64)
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE


def test_truncation_and_records_left_without_labels(tokenizer) -> None:  # type: ignore[no-untyped-def]
    long_prompt = {"prompt": "word " * 50, "completion": " end"}
    example = data.tokenize_record(long_prompt, "prompt_completion", tokenizer, 16)
    assert len(example.input_ids) == len(example.labels) == 16
    assert example.trained_tokens == 0

    dataset = data.build_dataset(
        [long_prompt, {"prompt": "a", "completion": " b"}], "prompt_completion", tokenizer, 16
    )
    assert dataset.dropped == 1 and len(dataset.examples) == 1
    with pytest.raises(ValueError, match="max_seq_length=16"):
        data.build_dataset([long_prompt], "prompt_completion", tokenizer, 16)


def test_formats_are_detected_and_must_agree(tmp_path: Path) -> None:
    for record, fmt in [
        ({"text": "x"}, "text"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "chat"),
    ]:
        records, found = data.load_records(write(tmp_path, [json.dumps(record)]))
        assert found == fmt and len(records) == 1

    mixed = write(tmp_path, [json.dumps({"text": "x"}), "", json.dumps({"prompt": "p", "completion": "c"})])
    with pytest.raises(
        ValueError, match=r"d.jsonl line 3: record is 'prompt_completion' but the dataset is 'text'"
    ):
        data.load_records(mixed)
    with pytest.raises(ValueError, match="line 1: record is 'text' but the dataset is 'chat'"):
        data.load_records(write(tmp_path, [json.dumps({"text": "x"})]), "chat")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: invalid JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        (json.dumps({"input": "x"}), "line 2: unrecognised record"),
        (json.dumps({"text": ""}), "line 2: 'text' must be a non-empty string"),
        (json.dumps({"prompt": "p", "completion": 5}), "line 2: 'completion' must be a non-empty string"),
        (json.dumps({"messages": []}), "line 2: 'messages' must be a non-empty list"),
        (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), r"line 2: messages\[0\].role"),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "line 2: a chat record needs"),
    ],
)
def test_bad_records_name_their_line(tmp_path: Path, line: str, message: str) -> None:
    first = {"messages": [{"role": "assistant", "content": "ok"}]} if "messages" in line else {"text": "ok"}
    if "prompt" in line:
        first = {"prompt": "p", "completion": "c"}
    with pytest.raises(ValueError, match=message):
        data.load_records(write(tmp_path, [json.dumps(first), line]))


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no records"):
        data.load_records(write(tmp_path, ["", "  "]))


def test_eval_split_is_deterministic_and_disjoint() -> None:
    items = list(range(20))
    train, held = data.split_train_eval(items, 0.25, seed=3)
    assert len(held) == 5 and sorted(train + held) == items
    assert (train, held) == data.split_train_eval(items, 0.25, seed=3)
    assert held != data.split_train_eval(items, 0.25, seed=4)[1]
    assert data.split_train_eval(items, 0.0, seed=3) == (items, [])
    assert (
        len(data.split_train_eval(items[:3], 0.01, seed=3)[1]) == 1
    )  # a fraction > 0 holds out at least one


def test_epoch_order_is_a_seeded_permutation() -> None:
    assert sorted(data.epoch_order(10, 1, 0)) == list(range(10))
    assert data.epoch_order(10, 1, 0) == data.epoch_order(10, 1, 0)
    assert data.epoch_order(10, 1, 0) != data.epoch_order(10, 1, 1)


def test_collate_pads_right_and_masks_padding() -> None:
    batch = data.collate([data.Example([5, 6, 7], [-100, 6, 7]), data.Example([8], [8])], pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["input_ids"].dtype == torch.long
