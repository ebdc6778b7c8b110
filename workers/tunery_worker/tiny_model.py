"""Tiny random-weight causal LMs for tests and the demo, built entirely on this machine.

`make_tiny_model(dir)` writes a directory that `from_pretrained` loads like any hub checkpoint:
a small Llama or Qwen2 with random weights and a byte-level BPE tokenizer trained here on a
built-in corpus, with chat special tokens and a chat template. Nothing is downloaded, and the same
seed gives byte-identical weights and tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_PRETOKENIZE_REGEX
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

Arch = Literal["llama", "qwen2"]

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START, IM_END]

# ChatML-style template. `{% generation %}` marks assistant text so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` can find it; `add_generation_prompt`
# opens an assistant turn for inference.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A small English corpus: enough distinct words for a ~512-token BPE vocabulary to learn merges.
_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A model learns to predict the next token from the tokens before it.",
    "Fine-tuning adapts a pretrained language model to a new task with a small dataset.",
    "Low-rank adapters add two small matrices beside each frozen weight matrix.",
    "The learning rate warms up, then decays along a cosine or a linear schedule.",
    "Checkpoints hold the weights, the optimizer state, the scheduler and the random state.",
    "User: What is the capital of France? Assistant: The capital of France is Paris.",
    "User: How many legs does a spider have? Assistant: A spider has eight legs.",
    "Numbers: zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 42 100.",
    "Perplexity is the exponential of the mean negative log-likelihood per token.",
    "Workers claim jobs from a queue, report progress, upload artifacts and complete the job.",
    "Hello world! Good morning, good evening, thank you, please, yes, no, maybe.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    '{"prompt": "Say hi", "completion": "Hi!"} {"text": "plain text"}',
    "system user assistant tool function message content role name",
    "Red green blue yellow orange purple black white grey brown pink.",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April.",
    "Cats and dogs, birds and fish, trees and flowers, rivers and mountains, sun and moon.",
]


def build_tokenizer(vocab_size: int = 512, arch: Arch = "llama") -> PreTrainedTokenizerBase:
    """Train a byte-level BPE tokenizer on the built-in corpus (deterministic: same corpus, same merges).

    `AutoTokenizer` loads a Qwen2 directory with `Qwen2Tokenizer`, which rebuilds its pipeline from
    the vocabulary and merges with Qwen2's own pre-tokenizer. So the qwen2 tokenizer is trained with
    that pipeline and saved as that class: what is saved is exactly what loads.
    """
    tok = Tokenizer(models.BPE())
    if arch == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Every byte is in the alphabet, so any input text tokenizes without an unknown token.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)

    special = {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "extra_special_tokens": [IM_START, IM_END],
    }
    tokenizer: PreTrainedTokenizerBase
    if arch == "qwen2":
        bpe = json.loads(tok.to_str())["model"]
        # unk_token=None: byte-level BPE never needs one, and Qwen2's default would add a 513th token.
        # (Qwen2Tokenizer's annotations say str for every special token; None is what it accepts.)
        qwen2: Any = Qwen2Tokenizer
        tokenizer = qwen2(
            vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], unk_token=None, **special
        )
    else:
        # Byte-level offsets must not be trimmed, or assistant masks from offsets drift by a space.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 2048
    return tokenizer


def make_tiny_model(
    out_dir: str | Path,
    arch: Arch = "llama",
    seed: int = 0,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab_size: int = 512,
    max_positions: int = 512,
    # HF's 0.02 leaves a random model's logits tiny and near-uniform; a frozen LM head that small caps
    # what LoRA can learn. 0.1 gives a base that an adapter can steer, as it can a pretrained one.
    initializer_range: float = 0.1,
) -> Path:
    """Write a random-init causal LM and its tokenizer to `out_dir` (HF format) and return the path."""
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown arch {arch!r}: expected 'llama' or 'qwen2'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size, arch)

    common = dict(
        # The real vocabulary can come out slightly smaller than asked; the embedding matches it.
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    model: PreTrainedModel
    # Seed right before construction: weight init is the only randomness, so the seed fixes it.
    torch.manual_seed(seed)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))

    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
