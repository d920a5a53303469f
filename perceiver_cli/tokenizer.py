"""Byte-level tokenizer of the reference: `[CLS] bytes [SEP]`, byte b -> id b + 6."""

from __future__ import annotations

PAD, BOS, EOS, MASK, CLS, SEP = range(6)
NUM_SPECIAL = 6  # ids below this are special tokens, never bytes


def encode(data: bytes) -> list[int]:
    """Token ids of `data` wrapped as the reference tokenizer wraps text."""
    return [CLS, *(b + NUM_SPECIAL for b in data), SEP]


def decode(ids) -> bytes:
    """Bytes of the byte ids in `ids`; special ids are dropped."""
    return bytes(i - NUM_SPECIAL for i in ids if i >= NUM_SPECIAL)
