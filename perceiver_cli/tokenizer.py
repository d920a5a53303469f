"""Byte-level tokenizer of the reference: `[CLS] bytes [SEP]`, byte b -> id b + 6.

Every conversion between bytes and token ids goes through the helpers here.
"""

from __future__ import annotations

PAD, BOS, EOS, MASK, CLS, SEP = range(6)
NUM_SPECIAL = 6  # ids below this are special tokens, never bytes


def byte_id(b: int) -> int:
    """The token id of byte value b."""
    return b + NUM_SPECIAL


def byte_ids(data: bytes) -> list[int]:
    """Token ids of raw bytes (no [CLS]/[SEP])."""
    return [b + NUM_SPECIAL for b in data]


def encode(data: bytes) -> list[int]:
    """Token ids of `data` wrapped as the reference tokenizer wraps text."""
    return [CLS, *byte_ids(data), SEP]


def decode(ids) -> bytes:
    """Bytes of the byte ids in `ids`; special ids are dropped."""
    return bytes(i - NUM_SPECIAL for i in ids if i >= NUM_SPECIAL)


def byte_logp(logp):
    """The byte part (..., 256) of (..., vocab) scores: column j is byte j."""
    return logp[..., NUM_SPECIAL:]
