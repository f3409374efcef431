"""How a generated answer is scored against the record's: exact match after light normalisation.

Stage two's evaluation (``evaluate``) uses it, and so do the demo's closed-set questions, whose
answers are one or two words.
"""

from __future__ import annotations


def normalize_answer(text: str) -> str:
    """Lower-case, trim, collapse inner whitespace and drop trailing ``.``/``!``."""
    return " ".join(str(text).strip().lower().split()).rstrip(".!").strip()


def exact_match(pred: str, gold: str) -> bool:
    """Accuracy metric for the closed answer sets: equality after ``normalize_answer``."""
    return normalize_answer(pred) == normalize_answer(gold)
