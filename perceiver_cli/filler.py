"""Fill the masked spans of texts: the public Python API.

    filler = MaskFiller.from_pretrained("deepmind/language-perceiver")
    result = filler.fill("This is an incomplete sentence where some words are [MASK:9]")
    result.text, result.spans[0].fill

How a text becomes model passes:

1. `masks.parse` cuts the text at its markers into literal bytes and spans.
2. Spans of auto length (`[MASK]`) get a length (`_choose_lengths`).
3. The document's bytes, spans masked, are cut into windows of at most
   `max_position_embeddings - 2` bytes (room for `[CLS]` and `[SEP]`). A document that
   fits is one window: exactly the reference's input. A longer one gets a window per
   group of nearby spans, centred on the group, holding as much context as fits.
4. A strategy (`strategies.py`) fills every window's spans with forward passes that
   `_Runner` batches. `oneshot`: every masked byte is the argmax over the 256 byte ids
   of one pass, which reproduces the reference exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from . import masks, strategies, tokenizer
from .errors import InputError, PerceiverError
from .model import PerceiverMaskedLM

DEFAULT_MODEL = "deepmind/language-perceiver"
DEFAULT_STRATEGY = strategies.DEFAULT_STRATEGY
DEFAULT_MAX_SPAN = 16  # longest span `[MASK]` may choose, in bytes
DEFAULT_BATCH_SIZE = 8  # windows per forward pass
EXPLAIN_TOP = 5  # alternatives kept per masked byte
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class Candidate:
    """One whole-span alternative."""

    data: bytes
    logprob: float  # sum over its bytes of log_softmax over the full vocabulary

    @property
    def fill(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self) -> dict:
        return {"fill": self.fill, "bytes": list(self.data), "logprob": round(self.logprob, 6)}


@dataclass
class SpanResult:
    start: int  # character offset of the marker in the input
    length: int  # bytes
    data: bytes  # the chosen fill
    logprob: float
    byte_logprobs: list[float]  # log-probability of each chosen byte
    alternatives: list[list[tuple[int, float]]]  # per byte: the top bytes and their log-probabilities
    candidates: list[Candidate] = field(default_factory=list)  # best first; [0] is the fill itself

    @property
    def fill(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self, top_k: int = 0) -> dict:
        d = {"start": self.start, "length": self.length, "fill": self.fill, "bytes": list(self.data),
             "logprob": round(self.logprob, 6)}
        if top_k:
            d["candidates"] = [c.to_dict() for c in self.candidates[:top_k]]
        return d


@dataclass
class FillResult:
    data: bytes  # the whole filled text, every byte outside the spans unchanged
    spans: list[SpanResult]
    pieces: tuple[bytes, ...] = ()  # the literal bytes around the spans (for rendering)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")

    def to_dict(self, top_k: int = 0) -> dict:
        return {"text": self.text, "spans": [s.to_dict(top_k) for s in self.spans]}


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """`auto` (or None): float16 on CUDA, float32 elsewhere.

    On CUDA, half precision is what makes batches fast. float16 rather than bfloat16: on
    the small trained model's 400 test cases, oneshot fills in float16 equal the float32
    fills on 98.5%, in bfloat16 on 87.0% (8 bits of mantissa against 10;
    `scripts/int8_agreement.py --variant`). float16's narrower range is guarded: a pass
    whose logits come out non-finite is an error that names `--dtype float32`.
    """
    name = (name or "auto").lower()
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return DTYPES[name]


def pick_device(name: str = "auto") -> torch.device:
    """`auto` takes CUDA, then MPS, then the CPU; a named device must be available."""
    name = (name or "auto").lower()
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name not in ("cpu", "cuda", "mps") and not name.startswith("cuda:"):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda or mps")
    if name.startswith("cuda") and not cuda:
        raise InputError(f"device {name!r} is not available on this machine (use --device cpu or auto)")
    if name == "mps" and not mps:
        raise InputError("device 'mps' is not available on this machine (use --device cpu or auto)")
    return torch.device(name)


class _Runner:
    """Batched forward passes: (ids, positions) pairs in, log-probabilities out."""

    def __init__(self, model: PerceiverMaskedLM, device: torch.device, batch_size: int):
        self.model, self.device, self.batch_size = model, device, max(1, batch_size)
        self.passes = 0  # forward passes run, for measurements
        self.rows = 0  # texts (windows) those passes ran: the compute spent

    @torch.inference_mode()
    def __call__(self, jobs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """For each (ids, positions): log_softmax over the vocabulary at those positions, (M, V) fp32."""
        out: list[torch.Tensor | None] = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][0]))  # similar lengths share a batch
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            n = max(len(jobs[j][0]) for j in chunk)
            m = max(len(jobs[j][1]) for j in chunk)
            ids = torch.full((len(chunk), n), tokenizer.PAD, dtype=torch.long)
            mask = torch.zeros((len(chunk), n), dtype=torch.bool)
            pos = torch.zeros((len(chunk), m), dtype=torch.long)
            for row, j in enumerate(chunk):
                job_ids, job_pos = jobs[j]
                ids[row, : len(job_ids)] = torch.tensor(job_ids)
                mask[row, : len(job_ids)] = True
                pos[row, : len(job_pos)] = torch.tensor(job_pos)
            padded = any(len(jobs[j][0]) < n for j in chunk)
            logits = self.model(ids.to(self.device), mask.to(self.device) if padded else None, pos.to(self.device))
            if not torch.isfinite(logits).all():
                raise PerceiverError(_non_finite(logits.dtype))
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            self.passes += 1
            self.rows += len(chunk)
            for row, j in enumerate(chunk):
                out[j] = logp[row, : len(jobs[j][1])]
        return out  # type: ignore[return-value]


class MaskFiller:
    """Fills `[MASK]` / `[MASK:N]` spans with a Perceiver IO masked language model."""

    def __init__(self, model: PerceiverMaskedLM, device: torch.device | str = "cpu", batch_size: int = DEFAULT_BATCH_SIZE):
        self.model = model
        self.device = torch.device(device)
        self.window = model.cfg.max_position_embeddings - 2  # bytes; [CLS] and [SEP] take two positions
        self.runner = _Runner(model, self.device, batch_size)

    @classmethod
    def from_pretrained(
        cls,
        model: str = DEFAULT_MODEL,
        *,
        revision: str | None = None,
        device: str = "auto",
        offline: bool = False,
        batch_size: int = DEFAULT_BATCH_SIZE,
        quantize: str | None = None,
        threads: int | None = None,
        dtype: str | None = None,
        progress: bool = False,
    ) -> "MaskFiller":
        """Load a local checkpoint directory or a Hub repo id (downloaded once, then cached).

        `dtype` (`pick_dtype`): by default float16 on CUDA and float32 elsewhere (float32
        is the one that reproduces the reference exactly); with `quantize="int8"` (CPU,
        float32) the heaviest products are int8 (see quantize.py).
        `threads` sets torch's CPU threads (default: torch's, all cores). `progress` shows
        a download progress bar on stderr (the CLI sets it when stderr is a terminal).
        """
        from .checkpoint import load_model, weights_file
        from .hub import resolve_model

        quantize = quantize.lower() if isinstance(quantize, str) else quantize  # as --device: any case
        if quantize not in (None, "none", "int8"):
            raise InputError(f"unknown quantization {quantize!r}: use int8 or none")
        if threads is not None:
            cpus = os.cpu_count() or 1
            if not 1 <= threads <= cpus:
                raise InputError(f"threads must be between 1 and {cpus}, this machine's CPUs (got {threads})")
            torch.set_num_threads(threads)
        dev = pick_device(device)
        if quantize == "int8" and dev.type != "cpu":
            raise InputError("int8 quantization runs on the CPU only: add --device cpu")
        weights_dtype = pick_dtype(dtype, dev)
        if quantize == "int8" and weights_dtype != torch.float32:
            raise InputError("int8 quantization keeps the other products in float32: drop --dtype or use float32")
        directory = resolve_model(model, revision=revision, offline=offline, progress=progress)
        net = load_model(directory, device=dev, dtype=weights_dtype)  # float32: the mapped tensors, no copy
        if quantize == "int8":
            from .quantize import cache_path, quantize_int8

            quantize_int8(net, cache_path(weights_file(directory)))
        return cls(net, dev, batch_size)

    # -- public API ---------------------------------------------------------------------

    def fill(self, text: str, **options) -> FillResult:
        """Fill every marker of one document. Raises `InputError` for bad markers."""
        result = self.fill_many([text], return_errors=True, **options)[0]
        if isinstance(result, Exception):
            raise result
        return result

    def fill_many(
        self,
        texts: list[str],
        *,
        strategy: str = DEFAULT_STRATEGY,
        top_k: int = 1,
        max_span: int = DEFAULT_MAX_SPAN,
        mask_token: str = masks.DEFAULT_MASK_TOKEN,
        return_errors: bool = False,
    ) -> list[FillResult | InputError]:
        """Fill independent texts, batched; results in input order.

        With `return_errors`, a text that cannot be filled gets its `InputError` in its
        place and the others go on; otherwise the first such error is raised.
        """
        if strategy not in strategies.STRATEGIES:
            raise InputError(f"unknown strategy {strategy!r}: choose one of {', '.join(strategies.STRATEGIES)}")
        if top_k < 1:
            raise InputError("top-k must be at least 1")
        if not 1 <= max_span <= self.window:
            raise InputError(f"max-span must be between 1 and {self.window} bytes")
        results: list = [None] * len(texts)
        templates: dict[int, masks.Template] = {}
        for i, text in enumerate(texts):
            try:
                templates[i] = self._check(masks.parse(text, mask_token))
            except InputError as e:
                if not return_errors:
                    raise
                results[i] = e
        order = list(templates)
        requests = [
            strategies.LengthRequest(
                lengths=[s.length for s in templates[i].spans],
                space=[s.space for s in templates[i].spans],
                make_jobs=lambda lengths, t=templates[i]: self._jobs(t, lengths),
            )
            for i in order
        ]
        run = strategies.Reuse(self.runner)  # a length-scoring pass doubles as the strategy's first
        lengths = strategies.choose_lengths(run, requests, max_span)
        jobs = [(i, job) for i, n in zip(order, lengths) for job in self._jobs(templates[i], n)]
        fills = strategies.STRATEGIES[strategy](run, [job for _, job in jobs], top_k)
        spans: dict[int, list] = {i: [None] * len(templates[i].spans) for i in order}
        for (i, job), job_fills in zip(jobs, fills):
            for s, f in zip(job.targets, job_fills):
                spans[i][s] = _span_result(templates[i].spans[s], f)
        for i in order:
            t = templates[i]
            results[i] = FillResult(t.render([s.data for s in spans[i]]), spans[i], t.pieces)
        return results

    # -- internals ----------------------------------------------------------------------

    def _check(self, template: masks.Template) -> masks.Template:
        for span in template.spans:
            if span.length is not None and span.length > self.window:
                raise InputError(
                    f"[MASK:{span.length}] at character {span.start} is longer than the model's "
                    f"{self.window}-byte window"
                )
        return template

    def _jobs(self, template: masks.Template, lengths: list[int]) -> list[strategies.Job]:
        """Model inputs (windows) covering every span of one text (see the module docstring)."""
        ids: list[int] = []
        starts: list[int] = []  # byte offset of each span in the document
        for piece, n in zip(template.pieces, lengths):
            ids += [b + tokenizer.NUM_SPECIAL for b in piece]
            starts.append(len(ids))
            ids += [tokenizer.MASK] * n
        ids += [b + tokenizer.NUM_SPECIAL for b in template.pieces[-1]]
        groups: list[list[int]] = []
        for s in range(len(lengths)):
            if groups and starts[s] + lengths[s] - starts[groups[-1][0]] <= self.window:
                groups[-1].append(s)
            else:
                groups.append([s])
        jobs = []
        for group in groups:
            first, last = group[0], group[-1]
            lo, hi = starts[first], starts[last] + lengths[last]
            begin = max(0, min(lo - (self.window - (hi - lo)) // 2, len(ids) - self.window))
            chunk = ids[begin : begin + self.window]
            jobs.append(strategies.Job(
                ids=[tokenizer.CLS, *chunk, tokenizer.SEP],
                spans=[(starts[s] - begin + 1, lengths[s]) for s in group],
                targets=group,
            ))
        return jobs


def _span_result(span: masks.Span, fill: strategies.SpanFill) -> SpanResult:
    byte_logp = fill.logp[:, tokenizer.NUM_SPECIAL :]  # (n, 256)
    top = byte_logp.topk(min(EXPLAIN_TOP, byte_logp.shape[-1]), dim=-1)
    return SpanResult(
        start=span.start,
        length=len(fill.data),
        data=fill.data,
        logprob=float(sum(fill.byte_logprobs)),
        byte_logprobs=fill.byte_logprobs,
        alternatives=[list(zip(ix.tolist(), lp.tolist())) for lp, ix in zip(top.values, top.indices)],
        candidates=[Candidate(data, score) for data, score in fill.candidates],
    )


def _non_finite(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 overflowed on this input (the model's logits are not finite): run with --dtype float32 (or bfloat16)"
    if dtype == torch.bfloat16:
        return "the model's logits are not finite in bfloat16: run with --dtype float32"
    return "the model's logits are not finite: the checkpoint's weights may hold NaN or inf values"
