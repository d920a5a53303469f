"""The Hugging Face fill-mask task, as transformers' pipeline("fill-mask") answers it with
`PerceiverTokenizer` for this model: request bodies in, answers out. No HTTP, no model.

    job = hf_job({"inputs": "Hello [MASK]orld", "parameters": {"top_k": 3}}, window=2048)
    logp = filler.logprobs([(job.ids, job.positions)])[0]     # (masks, vocab) log-probabilities
    hf_answer(job, logp)  # [{"score", "token", "token_str", "sequence"}, ...] (a list of lists
                          #  when the text holds several mask tokens)

PerceiverTokenizer turns the six special-token literals in a text into their ids (so
"[MASK]" is ONE masked byte position) and every other character into its UTF-8 bytes
(id = byte + 6); it wraps the ids as [CLS] ... [SEP]. Decoding joins the bytes of byte ids
and the literals of special ids and decodes the whole with errors="replace". The pipeline
scores every mask position with softmax over the whole vocabulary. This module reproduces
it (tests/test_fillmask.py compares with the pipeline), and bounds the answer: each
candidate repeats the whole sequence, so an answer over `MAX_HF_ANSWER` bytes is refused
before any work.

It imports neither torch (`hf_answer` takes the log-probabilities as a tensor and only
calls its methods) nor anything of HTTP or the server: the server maps HTTP to it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import tokenizer
from .errors import InputError
from .results import dumps

HF_TOP_K = 5  # the fill-mask pipeline's default
MAX_HF_ANSWER = 8 << 20  # bytes a fill-mask answer may take (masks x top_k candidates, each the whole sequence)

SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[MASK]", "[CLS]", "[SEP]")  # ids 0..5
_SPECIAL_SPLIT = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))
_SPECIAL_BYTES = tuple(t.encode() for t in SPECIAL_TOKENS)


def hf_encode(text: str, special_tokens: bool = True) -> list[int]:
    """PerceiverTokenizer's ids for `text` (wrapped in [CLS] ... [SEP] unless
    special_tokens=False). Raises UnicodeEncodeError for a lone surrogate."""
    ids: list[int] = [tokenizer.CLS] if special_tokens else []
    pos = 0
    for m in _SPECIAL_SPLIT.finditer(text):
        ids += tokenizer.byte_ids(text[pos : m.start()].encode("utf-8"))
        ids.append(SPECIAL_TOKENS.index(m.group()))
        pos = m.end()
    ids += tokenizer.byte_ids(text[pos:].encode("utf-8"))
    if special_tokens:
        ids.append(tokenizer.SEP)
    return ids


def _token_bytes(token: int, skip_special: bool) -> bytes:
    data = tokenizer.decode([token])  # b"" for a special id
    return data if data or skip_special else _SPECIAL_BYTES[token]


def hf_decode(ids: list[int], skip_special: bool = False) -> str:
    """PerceiverTokenizer.decode(ids, skip_special_tokens=skip_special)."""
    return b"".join(_token_bytes(t, skip_special) for t in ids).decode("utf-8", "replace")


def hf_target_ids(targets: list[str]) -> list[int]:
    """The pipeline's `get_target_ids`: a one-character target in the vocabulary (chr(b)
    for a byte b, or a special literal) is that id; another is tokenized and its first id
    taken; an empty one is dropped. Then `list(set(...))`, in the pipeline's order."""
    ids = []
    for target in targets:
        if len(target) == 1 and ord(target) < 256:
            ids.append(tokenizer.byte_id(ord(target)))
        elif target in SPECIAL_TOKENS:
            ids.append(SPECIAL_TOKENS.index(target))
        else:
            try:
                first = hf_encode(target, special_tokens=False)[:1]
            except UnicodeEncodeError:
                raise InputError(f"target {target!r} is not valid Unicode text") from None
            ids += first
    ids = list(set(ids))
    if not ids:
        raise InputError("At least one target must be provided when passed.")
    return ids


@dataclass
class HFJob:
    """One fill-mask request, ready for the model: ids, mask positions and what to answer."""

    ids: list[int]
    positions: list[int]
    top_k: int
    targets: list[int] | None


def hf_job(body: Any, window: int) -> HFJob:
    """Check a fill-mask request body and tokenize it for a model of `window` positions
    (`InputError` for a bad one)."""
    if not isinstance(body, dict):
        raise InputError('the request must be a JSON object: {"inputs": "text with [MASK]", "parameters": {...}}')
    unknown = sorted(set(body) - {"inputs", "parameters", "options"})
    if unknown:
        raise InputError(f"unknown field {unknown[0]!r}: the fields are inputs, parameters")
    if "inputs" not in body:
        raise InputError('missing field "inputs": the text with [MASK] tokens to fill')
    text = body["inputs"]
    if not isinstance(text, str):
        raise InputError(f'"inputs" must be a string (got {json_type(text)})')
    params = {} if body.get("parameters") is None else body["parameters"]
    if not isinstance(params, dict):
        raise InputError(f'"parameters" must be an object (got {json_type(params)})')
    unknown = sorted(k for k in params if k not in ("top_k", "targets"))
    if unknown:
        raise InputError(f"unknown parameter {unknown[0]!r}: the fill-mask parameters are top_k, targets")
    top_k = params.get("top_k")
    if top_k is None:
        top_k = HF_TOP_K
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise InputError(f'"top_k" must be a whole number (got {json_type(top_k)})')
    if top_k < 1:
        raise InputError(f'"top_k" must be at least 1 (got {top_k})')
    targets = params.get("targets")
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise InputError('"targets" must be a string or a list of strings')
        targets = hf_target_ids(targets)
    try:
        ids = hf_encode(text)
    except UnicodeEncodeError:
        raise InputError('"inputs" is not valid Unicode text (it holds a lone surrogate)') from None
    positions = [i for i, t in enumerate(ids) if t == tokenizer.MASK]
    if not positions:
        raise InputError("No mask_token ([MASK]) found on the input")
    if len(ids) > window:
        raise InputError(f'"inputs" is {len(ids)} tokens with [CLS] and [SEP]: the model takes at most {window}')
    # Each candidate repeats the whole sequence (other masks and specials spelt out): bound the answer.
    per_candidate = len(dumps(hf_decode(ids))) + 100
    candidates = len(positions) * min(top_k, len(targets) if targets is not None else 256 + tokenizer.NUM_SPECIAL)
    if candidates * per_candidate > MAX_HF_ANSWER:
        raise InputError(f"the answer would hold {candidates} candidates of about {per_candidate} bytes each, "
                         f"over the server's {MAX_HF_ANSWER >> 20} MiB a fill-mask answer may take: "
                         "ask for a smaller top_k, or fewer [MASK] tokens per request")
    return HFJob(ids, positions, top_k, targets)


def hf_answer(job: HFJob, logp) -> list:
    """The pipeline's answer from the log-probabilities (M, vocab) at the mask positions (a
    torch tensor: only its methods are called)."""
    scores = logp if job.targets is None else logp[:, job.targets]
    k = min(job.top_k, scores.shape[-1])
    values, indices = scores.topk(k, dim=-1)
    probs = values.exp().tolist()
    single = len(job.positions) == 1
    # the tokens as the pipeline decodes them: [PAD] filtered out, specials kept (several masks) or skipped (one)
    parts = [_token_bytes(t, single) if t != tokenizer.PAD else b"" for t in job.ids]
    rows = []
    for i, pos in enumerate(job.positions):
        row = []
        for score, index in zip(probs[i], indices[i].tolist()):
            token = job.targets[index] if job.targets is not None else index
            parts_i = parts.copy()
            parts_i[pos] = _token_bytes(token, single) if token != tokenizer.PAD else b""
            row.append({
                "score": score,
                "token": token,
                "token_str": hf_decode([token]),
                "sequence": b"".join(parts_i).decode("utf-8", "replace"),
            })
        rows.append(row)
    return rows[0] if single else rows


def json_type(value: Any) -> str:
    """How an error message names the JSON type of `value`."""
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


__all__ = ["HFJob", "hf_job", "hf_answer", "hf_encode", "hf_decode", "hf_target_ids", "MAX_HF_ANSWER"]
