"""Plain-text measures shared by curation (distill) and scoring (benchmark). Words are whitespace-split."""

from __future__ import annotations

from collections import Counter


def distinct_bigram_ratio(text: str) -> float:
    """Distinct word bigrams / all word bigrams: 1 for text that never repeats itself, → 0 for a loop.

    Text of fewer than two words has no bigram to repeat and scores 1.
    """
    words = text.split()
    if len(words) < 2:
        return 1.0
    bigrams = list(zip(words, words[1:], strict=False))
    return len(set(bigrams)) / len(bigrams)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 of the two texts' lower-cased word multisets (1 = same words, 0 = none shared)."""
    predicted, expected = Counter(prediction.lower().split()), Counter(reference.lower().split())
    if not predicted or not expected:
        return float(predicted == expected)
    overlap = sum((predicted & expected).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / sum(predicted.values()), overlap / sum(expected.values())
    return 2 * precision * recall / (precision + recall)
