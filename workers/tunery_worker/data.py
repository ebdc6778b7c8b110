"""Training data: JSONL records → tokenized examples with masked labels → padded batches.

Accepted record shapes (one JSON object per line; the format is detected unless the spec names it):
  text               {"text": "..."}                                  every token is trained
  prompt_completion  {"prompt": "...", "completion": "..."}           only the completion is trained
  chat               {"messages": [{"role": "...", "content": "..."}]} only assistant turns are trained
`train_on_inputs=True` trains on every token of every format.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from transformers import PreTrainedTokenizerBase

Format = Literal["text", "prompt_completion", "chat"]
FORMATS: tuple[Format, ...] = ("text", "prompt_completion", "chat")
CHAT_ROLES = {"system", "user", "assistant", "tool"}
IGNORE_INDEX = -100  # the label value torch's cross_entropy skips
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trained_tokens(self) -> int:
        # Position 0 is never predicted, so its label never counts.
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class Dataset:
    format: Format
    examples: list[Example]
    # Records whose trainable part was cut away entirely by truncation (they would train nothing).
    dropped: int = 0


# --- reading and validating records ---------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Parse a JSONL file; blank lines are skipped, anything else that is not a JSON object is an error."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{Path(path).name} line {line_no}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{Path(path).name} line {line_no}: expected a JSON object")
            record["__line__"] = line_no
            records.append(record)
    if not records:
        raise ValueError(f"{Path(path).name}: no records")
    return records


def detect_format(record: dict[str, Any]) -> Format:
    if "messages" in record:
        return "chat"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    keys = sorted(k for k in record if k != "__line__")
    raise ValueError(f"unrecognised record with keys {keys}: expected text, prompt+completion or messages")


def validate_record(record: dict[str, Any], fmt: Format) -> None:
    """Raise ValueError (without the line number; the caller adds it) when `record` is not valid `fmt`."""
    if fmt == "text":
        _require_string(record, "text")
    elif fmt == "prompt_completion":
        _require_string(record, "prompt", allow_empty=True)
        _require_string(record, "completion")
    else:
        messages = record.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ValueError("'messages' must be a non-empty list")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object")
            if message.get("role") not in CHAT_ROLES:
                raise ValueError(f"messages[{i}].role must be one of {sorted(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str):
                raise ValueError(f"messages[{i}].content must be a string")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("a chat record needs at least one assistant message to learn from")


def _require_string(record: dict[str, Any], key: str, allow_empty: bool = False) -> None:
    value = record.get(key)
    if not isinstance(value, str) or (not allow_empty and not value):
        raise ValueError(f"'{key}' must be a {'' if allow_empty else 'non-empty '}string")


def load_records(path: str | Path, fmt: str | None = None) -> tuple[list[dict[str, Any]], Format]:
    """Read and validate a JSONL dataset; every record must have the one format (given, or the first's)."""
    records = read_jsonl(path)
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"unknown dataset_format {fmt!r}: expected one of {list(FORMATS)}")
    for record in records:
        where = f"{Path(path).name} line {record['__line__']}"
        try:
            found = detect_format(record)
            if fmt is None:
                fmt = found
            elif found != fmt:
                raise ValueError(f"record is {found!r} but the dataset is {fmt!r}")
            validate_record(record, found)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
    return records, cast(Format, fmt)


# --- tokenizing ---------------------------------------------------------------------------------------------


def tokenize_record(
    record: dict[str, Any],
    fmt: Format,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> Example:
    if fmt == "text":
        ids = _with_eos(tokenizer(record["text"])["input_ids"], tokenizer)
        labels = list(ids)
    elif fmt == "prompt_completion":
        ids, labels = _tokenize_prompt_completion(record["prompt"], record["completion"], tokenizer)
    else:
        from jinja2 import TemplateError  # imported here: only chat templates need jinja2

        try:
            ids, labels = _tokenize_chat(record["messages"], tokenizer)
        except TemplateError as err:
            # The template's own checks (e.g. "roles must alternate") reject this record: it fails the
            # same way on every attempt, so it is a dataset error (ValueError → invalid_dataset, with
            # build_dataset adding the line), not a retryable training error.
            raise ValueError(f"the model's chat template rejects this conversation: {err}") from None
    if train_on_inputs:
        labels = list(ids)
    return Example(input_ids=ids[:max_seq_length], labels=labels[:max_seq_length])


def _with_eos(ids: list[int], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    # The model must learn where a sample ends; without EOS it never learns to stop.
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        return [*ids, eos]
    return list(ids)


def _tokenize_prompt_completion(
    prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Tokenize prompt + completion as one text and train from the first token holding a completion
    character on. Tokenizing the two apart would not give the tokens the model sees at inference: a
    SentencePiece tokenizer puts a spurious "▁" before the completion, and byte-level BPE splits a
    number (or word) that straddles the boundary."""
    if not tokenizer.is_fast:  # no offsets: tokenized apart, the boundary a token boundary
        return _tokenize_prompt_completion_apart(prompt, completion, tokenizer)
    encoded = tokenizer(prompt + completion, return_offsets_mapping=True)
    ids = _with_eos(list(encoded["input_ids"]), tokenizer)
    boundary = len(prompt)
    # Special tokens (BOS) span no characters: (0, 0). A token straddling the boundary is trained, as
    # it holds completion text that no other token predicts.
    first = next(
        (i for i, (start, end) in enumerate(encoded["offset_mapping"]) if end > boundary and end > start),
        len(ids),
    )
    return ids, [IGNORE_INDEX] * first + ids[first:]


def _tokenize_prompt_completion_apart(
    prompt: str, completion: str, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    # Special tokens (BOS) belong at the start of the prompt only.
    prompt_ids = tokenizer(prompt)["input_ids"] if prompt else []
    completion_ids = _with_eos(tokenizer(completion, add_special_tokens=False)["input_ids"], tokenizer)
    ids = [*prompt_ids, *completion_ids]
    return ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


def _tokenize_chat(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; label only the tokens the assistant wrote."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model's tokenizer has no chat template, so chat records cannot be rendered")
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    text = _render(tokenizer, messages)
    spans = _assistant_char_spans(messages, tokenizer, text)
    if spans is None:
        return _tokenize_chat_generation_mask(messages, tokenizer)
    # The template already holds any BOS it wants, so no special tokens are added again.
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], prompt: bool = False) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert isinstance(text, str)
    return text


def _assistant_char_spans(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, full_text: str
) -> list[tuple[int, int]] | None:
    """Character spans of assistant replies in `full_text`, or None when they cannot be found this way.

    Assistant reply i spans from the end of the conversation before i rendered with a generation
    prompt, to the end of the conversation through i. That holds for any template whose rendering of
    a conversation prefix is a prefix of the whole rendering, which is checked.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        try:
            before = _render(tokenizer, messages[:i], prompt=True)
        except Exception:
            if i > 0:
                raise
            before = ""  # some templates refuse an empty conversation; nothing precedes turn 0 anyway
        through = _render(tokenizer, messages[: i + 1])
        if not (full_text.startswith(through) and through.startswith(before)):
            return None
        spans.append((len(before), len(through)))
    return spans


def _tokenize_chat_generation_mask(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Fallback for templates that render prefixes differently (e.g. dropping earlier reasoning):
    the template itself marks assistant text with `{% generation %}`."""
    if not _GENERATION_TAG.search(tokenizer.chat_template or ""):
        raise ValueError(
            "the chat template renders a conversation prefix differently from the whole conversation "
            "and has no {% generation %} markers, so assistant tokens cannot be located; "
            "set train_on_inputs or use the prompt_completion format"
        )
    encoded = cast(
        dict[str, Any],
        tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        ),
    )
    ids = list(encoded["input_ids"])
    masks = encoded["assistant_masks"]
    labels = [token if mask else IGNORE_INDEX for token, mask in zip(ids, masks, strict=True)]
    return ids, labels


def build_dataset(
    records: Sequence[dict[str, Any]],
    fmt: Format,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_length: int,
    train_on_inputs: bool = False,
) -> Dataset:
    """Tokenize every record; records left with nothing to train on after truncation are dropped."""
    examples, dropped = [], 0
    for record in records:
        try:
            example = tokenize_record(record, fmt, tokenizer, max_seq_length, train_on_inputs)
        except ValueError as err:
            raise ValueError(f"line {record.get('__line__', '?')}: {err}") from None
        if example.trained_tokens == 0:
            dropped += 1
        else:
            examples.append(example)
    if not examples:
        raise ValueError(
            f"no record has a token to train on within max_seq_length={max_seq_length} "
            f"({dropped} dropped); raise max_seq_length or shorten the prompts"
        )
    return Dataset(format=fmt, examples=examples, dropped=dropped)


# --- splitting and batching ----------------------------------------------------------------------------


def split_train_eval(items: Sequence[Any], eval_split: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out `eval_split` of `items` (at least one when the fraction is > 0), chosen by `seed`."""
    if not 0.0 <= eval_split < 1.0:
        raise ValueError(f"eval_split must be in [0, 1), got {eval_split}")
    if eval_split == 0.0 or len(items) < 2:
        return list(items), []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(items) - 1, max(1, math.floor(len(items) * eval_split)))
    held_out = set(order[:n_eval])
    train = [item for i, item in enumerate(items) if i not in held_out]
    evaluation = [item for i, item in enumerate(items) if i in held_out]
    return train, evaluation


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of epoch `epoch`: a pure function of (seed, epoch), so a resume finds its place."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padded positions are masked in attention and labels."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def batches(examples: Sequence[Example], batch_size: int, pad_token_id: int) -> list[dict[str, torch.Tensor]]:
    """Fixed-order batches (for evaluation)."""
    return [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]


def pack(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Several examples per row: `input_ids`, `labels` and `position_ids`, no `attention_mask`.

    Rows are as wide as the longest example; examples go in longest first, each into the first row
    with room (first-fit decreasing), so short examples fill the gaps padding would take. Positions
    restart at 0 for every example, which transformers reads as packed sequences: attention stays
    within each example (a block-diagonal causal mask with sdpa/eager, varlen kernels with flash
    attention), so an example's loss is what it would be alone. An example's first token is not
    predicted from the one before it (label -100), as in a row of its own. The padding at a row's end
    is a segment of its own, unlabelled. Rows without padding or packing run the plain causal kernel.
    """
    width = max(len(e.input_ids) for e in examples)
    rows: list[list[Example]] = []
    room: list[int] = []
    for example in sorted(examples, key=lambda e: len(e.input_ids), reverse=True):
        n = len(example.input_ids)
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(example)
        room[row] -= n
    width = max(width - free for free in room)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row_examples in enumerate(rows):
        at = 0
        for example in row_examples:
            n = len(example.input_ids)
            input_ids[r, at : at + n] = torch.tensor(example.input_ids, dtype=torch.long)
            labels[r, at + 1 : at + n] = torch.tensor(example.labels[1:], dtype=torch.long)
            position_ids[r, at : at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(width - at)
    if all(len(row) == 1 and len(row[0].input_ids) == width for row in rows):
        # Every row one example, no padding: the model's own positions (0..width-1) are these, and
        # without explicit ones it computes the rotary tables once for the batch instead of per row.
        return {"input_ids": input_ids, "labels": labels}
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_batches(
    examples: Sequence[Example], batch_size: int, pad_token_id: int
) -> list[dict[str, torch.Tensor]]:
    """Fixed-order batches of `batch_size` examples each, packed (for evaluation)."""
    return [pack(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]
