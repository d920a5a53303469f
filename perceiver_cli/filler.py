"""Fill the masked spans of texts: the public Python API.

    filler = MaskFiller.from_pretrained("deepmind/language-perceiver")  # or LoadOptions(...)
    result = filler.fill("This is an incomplete sentence where some words are [MASK:9]")
    result.text, result.spans[0].fill
    filler.fill(text, FillOptions(strategy="oneshot", top_k=3))  # or filler.fill(text, top_k=3)

How a text becomes model passes:

1. `masks.parse` cuts the text at its markers into literal bytes and spans.
2. Spans of auto length (`[MASK]`) get a length (`lengths.py`).
3. The document's bytes, spans masked, are cut into windows of at most
   `max_position_embeddings - 2` bytes (`windows.py`). A document that fits is one
   window: exactly the reference's input.
4. A strategy (`strategies.py`) fills every window's spans with forward passes that
   `_Runner` batches. `oneshot`: every masked byte is the argmax over the 256 byte ids
   of one pass, which reproduces the reference exactly.

Before step 2, each text's cost is estimated from what it asks and checked against the
budget (`budget.py`, `options.Budget`: `fill_many(..., budget=...)` or `filler.budget`);
a text over it gets `OverBudget`. The texts of a call are filled in groups whose
estimated memory fits the budget together.

With `choices` (`--choice WORD`), steps 2-4 are replaced: every span is filled with the
best of the given words, scored by `choices.py` (the strategy and top_k do not apply).
"""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import Callable

import torch

from . import budget as budgets
from . import choices, masks, strategies, tokenizer
from .errors import InputError, PerceiverError
from .lengths import LengthRequest, choose_lengths
from .model import PerceiverMaskedLM
from .options import Budget, FillOptions, LoadOptions, OptionError, model_window
from .results import Candidate, FillResult, SpanResult
from .windows import Layout

__all__ = ["MaskFiller", "FillResult", "SpanResult", "Candidate", "FillOptions", "LoadOptions"]

EXPLAIN_TOP = 5  # alternatives kept per masked byte
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float16 on CUDA, float32 elsewhere (`name` is a validated LoadOptions.dtype).

    On CUDA, half precision is what makes batches fast. float16 rather than bfloat16: on
    the small trained model's 400 test cases, oneshot fills in float16 equal the float32
    fills on 98.5%, in bfloat16 on 87.0% (8 bits of mantissa against 10;
    `scripts/int8_agreement.py --variant`). float16's narrower range is guarded: a pass
    whose logits come out non-finite is an error that names `--dtype float32`.

    bfloat16 on the CPU is the mixed mode (`is_mixed`, precision.py): the model stays
    float32 and its big matrix products run in bfloat16.
    """
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def is_mixed(dtype: torch.dtype, device: torch.device) -> bool:
    """bfloat16 on the CPU: float32 weights and arithmetic but the latent layers' big matrix
    products, in bfloat16 (precision.py). Whole-model bfloat16 changed 8-12% of the small
    model's fills, the mixed mode 1-2% (QUALITY.md, "Mixed precision"); on a GPU bfloat16
    is the whole model."""
    return dtype == torch.bfloat16 and device.type == "cpu"


def pick_device(name: str) -> torch.device:
    """`auto` takes CUDA, then MPS, then the CPU; a named device must be available
    (`name` is a validated LoadOptions.device)."""
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name.startswith("cuda") and not cuda:
        raise OptionError("device", f"{name!r} is not available on this machine (use cpu or auto)")
    if name == "mps" and not mps:
        raise OptionError("device", "'mps' is not available on this machine (use cpu or auto)")
    return torch.device(name)


class _Runner:
    """Batched forward passes: (ids, positions) pairs in, log-probabilities out."""

    def __init__(self, model: PerceiverMaskedLM, batch_size: int):
        self.model, self.batch_size = model, batch_size
        self.passes = 0  # forward passes run, for measurements
        self.rows = 0  # texts (windows) those passes ran: the compute spent
        # Called with a pass's number of inputs before it runs, and with 0 inside the long
        # loops between passes (`check`); raising stops the work there (the server stops
        # work whose client has gone, or that is over its budget).
        self.before_pass: Callable[[int], None] | None = None

    def check(self) -> None:
        """The stop check of the loops between passes: `before_pass(0)`."""
        if self.before_pass is not None:
            self.before_pass(0)

    @torch.inference_mode()
    def __call__(self, jobs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """For each (ids, positions): log_softmax over the vocabulary at those positions, (M, V) fp32."""
        device = self.model.device
        out: list[torch.Tensor | None] = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][0]))  # similar lengths share a batch
        for b in range(0, len(order), self.batch_size):
            chunk = order[b : b + self.batch_size]
            if self.before_pass is not None:
                self.before_pass(len(chunk))
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
            logits = self.model(ids.to(device), mask.to(device) if padded else None, pos.to(device))
            if not torch.isfinite(logits).all():
                raise PerceiverError(_non_finite(logits.dtype))
            logp = torch.log_softmax(logits.float(), dim=-1).cpu()
            self.passes += 1
            self.rows += len(chunk)
            for row, j in enumerate(chunk):
                out[j] = logp[row, : len(jobs[j][1])]
        return out  # type: ignore[return-value]


def _fill_signature(method):
    """Show FillOptions' fields as the keyword arguments of `fill`/`fill_many` in help()."""
    sig = inspect.signature(method)
    params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
               for f in fields(FillOptions)]
    method.__signature__ = sig.replace(parameters=params)
    return method


class MaskFiller:
    """Fills `[MASK]` / `[MASK:N]` spans with a Perceiver IO masked language model."""

    def __init__(self, model: PerceiverMaskedLM, batch_size: int = LoadOptions.batch_size):
        self.model = model
        self.window = model_window(model.cfg.max_position_embeddings)  # bytes of document per input
        self.runner = _Runner(model, batch_size)
        self.load_options: LoadOptions | None = None  # set by from_pretrained
        self.resolved = None  # hub.ResolvedModel, set by from_pretrained
        self.notes: list[str] = []  # things the user may want to know (the CLI shows them on stderr)
        self.budget = Budget()  # what one text may cost, when a call gives no budget (budget.py)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def parameters(self) -> int:
        return self.model.num_parameters()

    @property
    def mixed(self) -> bool:
        """Whether the model runs the mixed bfloat16 CPU mode (`is_mixed`, precision.py)."""
        from .precision import BF16Linear

        return any(isinstance(m, BF16Linear) for m in self.model.modules())

    @property
    def dtype(self) -> str:
        """What `--dtype` the model runs: float32, float16, or bfloat16 (with `mixed`, the CPU
        mode whose big products alone are bfloat16)."""
        return "bfloat16" if self.mixed else str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @classmethod
    def from_pretrained(cls, options: LoadOptions | str | None = None, *, progress: bool = False, **changes) -> "MaskFiller":
        """Load a local checkpoint directory or a Hub repo id (downloaded once, then cached).

        `options` is a `LoadOptions` or a model name (`changes` are LoadOptions fields:
        `MaskFiller.from_pretrained("dir", device="cpu")`). The dtype defaults to float16
        on CUDA and float32 elsewhere (float32 reproduces the reference exactly); with
        `quantize="int8"` (CPU, float32) the heaviest products are int8 (quantize.py).
        `threads` is not applied here: the library never sets torch's process-wide thread
        count (the CLI and the server do, see runtime.py). `progress` shows a download
        progress bar on stderr (the CLI sets it when stderr is a terminal).
        """
        from .checkpoint import load_model
        from .hub import resolve

        if isinstance(options, str):
            changes = {"model": options, **changes}
            options = None
        options = (options or LoadOptions()).replace(**changes)
        device = pick_device(options.device)
        resolved = resolve(options.model, options.revision, offline=options.offline, progress=progress)
        dtype = pick_dtype(options.dtype, device)
        mixed = is_mixed(dtype, device)
        net = load_model(resolved.directory, device=device, dtype=torch.float32 if mixed else dtype)
        notes = []
        if mixed:
            from . import precision

            precision.to_mixed(net, weights=resolved.weights)
            if precision.native_bf16() is False:
                notes.append(precision.EMULATED_NOTE)
        if options.quantize == "int8":
            from .quantize import quantize_int8

            note = quantize_int8(net, resolved.weights)  # a note when the int8 cache could not be written
            if note:
                notes.append(note)
        filler = cls(net, options.batch_size)
        filler.load_options, filler.resolved, filler.notes = options, resolved, notes
        return filler

    # -- public API ---------------------------------------------------------------------

    @_fill_signature
    def fill(self, text: str, options: FillOptions | None = None, *, budget: Budget | None = None,
             **changes) -> FillResult:
        """Fill every marker of one document. Raises `InputError` for bad markers, and
        `OverBudget` (an `InputError`) for a fill over the budget (`filler.budget` unless given).

        `options` is a `FillOptions`; keyword arguments change its fields
        (`filler.fill(text, strategy="oneshot", top_k=3)`).
        """
        result = self.fill_many([text], options, return_errors=True, budget=budget, **changes)[0]
        if isinstance(result, Exception):
            raise result
        return result

    @_fill_signature
    def fill_many(
        self, texts: list[str], options: FillOptions | None = None, *, return_errors: bool = False,
        budget: Budget | None = None, **changes
    ) -> list[FillResult | InputError]:
        """Fill independent texts, batched; results in input order.

        With `return_errors`, a text that cannot be filled gets its `InputError` in its
        place and the others go on; otherwise the first such error is raised. Each text is
        checked against `budget` (`filler.budget` unless given) before anything of it is
        built: over it, its error is an `OverBudget` naming the option to turn.
        """
        options = self.check((options or FillOptions()).replace(**changes))
        budget = budget or self.budget
        results: list = [None] * len(texts)
        templates: dict[int, masks.Template] = {}
        memory: dict[int, int] = {}
        for i, text in enumerate(texts):
            try:
                template = self._check(masks.parse(text, options.mask_token))
                if options.choices:
                    self._check_choices(template, options)
                cost = budgets.estimate(template, options, self.window)
                budgets.check(cost, budget)
                templates[i], memory[i] = template, cost.memory
            except InputError as e:
                if not return_errors:
                    raise
                results[i] = e
        group: list[int] = []
        for i in templates:  # in groups whose memory fits the budget together
            if group and sum(memory[k] for k in group) + memory[i] > budget.max_memory_mb * budgets.MB:
                self._fill_group(group, templates, options, results)
                group = []
            group.append(i)
        if group:
            self._fill_group(group, templates, options, results)
        return results

    def _fill_group(self, order: list[int], templates: dict[int, masks.Template], options: FillOptions,
                    results: list) -> None:
        """Fill the texts `order` (indices into `templates`), their results into `results`."""
        check = getattr(self.runner, "check", strategies._go_on)
        if options.choices:
            fills = choices.fill_choices(self.runner, [templates[i] for i in order], self.window, options, check=check)
            for i, span_fills in zip(order, fills):
                check()
                t = templates[i]
                spans_i = [_span_result(span, f, from_choices=True) for span, f in zip(t.spans, span_fills)]
                results[i] = FillResult(t.render([s.data for s in spans_i]), spans_i, t.pieces)
            return
        requests = [
            LengthRequest(
                lengths=[s.length for s in templates[i].spans],
                space=[s.space for s in templates[i].spans],
                layout=lambda lengths, t=templates[i]: self._layout(t, lengths),
            )
            for i in order
        ]
        run = strategies.Reuse(self.runner)  # a length-scoring pass doubles as the strategy's first
        lengths = choose_lengths(run, requests, options, check=check)
        run.remember = False  # the strategy's later passes are never asked again
        jobs = [(i, job) for i, n in zip(order, lengths) for job in self._layout(templates[i], n).jobs()]
        fills = strategies.STRATEGIES[options.strategy](run, [job for _, job in jobs], options, check=check)
        spans: dict[int, list] = {i: [None] * len(templates[i].spans) for i in order}
        for (i, job), job_fills in zip(jobs, fills):
            check()
            for s, f in zip(job.targets, job_fills):
                spans[i][s] = _span_result(templates[i].spans[s], f)
        for i in order:
            t = templates[i]
            results[i] = FillResult(t.render([s.data for s in spans[i]]), spans[i], t.pieces)

    def check(self, options: FillOptions) -> FillOptions:
        """`options`, checked against this model (what FillOptions cannot know alone)."""
        return options.check_window(self.window)

    def logprobs(self, jobs: list[tuple[list[int], list[int]]]) -> list[torch.Tensor]:
        """Batched forward passes. Each job is (token ids with [CLS] ... [SEP], positions to
        decode); each answer is log_softmax over the full vocabulary there, (M, V) float32."""
        return self.runner(jobs)

    # -- internals ----------------------------------------------------------------------

    def _check(self, template: masks.Template) -> masks.Template:
        for span in template.spans:
            if span.length is not None and span.length > self.window:
                raise InputError(
                    f"[MASK:{span.length}] at character {span.start} is longer than the model's "
                    f"{self.window}-byte window"
                )
        return template

    def _check_choices(self, template: masks.Template, options: FillOptions) -> None:
        """With choices a span's length is the choice's: a `[MASK:N]` is refused, and a
        choice must fit the window with the span's absorbed space."""
        for span in template.spans:
            if span.length is not None:
                raise InputError(
                    f"the marker at character {span.start} gives a length (:{span.length}); with --choice the "
                    f"choice gives the length: write {options.mask_token}"
                )
            for word in options.choices:
                n = len(masks.to_bytes(word)) + span.space
                if n > self.window:
                    raise InputError(
                        f"the choice {word[:20]!r} is {n} bytes with the space its span at character {span.start} "
                        f"takes in, longer than the model's {self.window}-byte window"
                    )

    def _layout(self, template: masks.Template, lengths: list[int]) -> Layout:
        return Layout(template, lengths, self.window)


def _span_result(span: masks.Span, fill: strategies.SpanFill, from_choices: bool = False) -> SpanResult:
    scores = tokenizer.byte_logp(fill.logp)  # (n, 256)
    top = scores.topk(min(EXPLAIN_TOP, scores.shape[-1]), dim=-1)
    return SpanResult(
        start=span.start,
        length=len(fill.data),
        data=fill.data,
        logprob=float(sum(fill.byte_logprobs)),
        byte_logprobs=fill.byte_logprobs,
        alternatives=[list(zip(ix.tolist(), lp.tolist())) for lp, ix in zip(top.values, top.indices)],
        candidates=_candidates(fill),
        from_choices=from_choices,
    )


def _candidates(fill: strategies.SpanFill) -> list[Candidate]:
    """Each candidate's log-probability; a choice's also the score that ranked it."""
    if isinstance(fill, choices.ChoiceFill):
        return [Candidate(data, lp, score, fill.rule) for (data, lp), score in zip(fill.candidates, fill.scores)]
    return [Candidate(data, lp) for data, lp in fill.candidates]


def _non_finite(dtype: torch.dtype) -> str:
    if dtype == torch.float16:
        return "float16 overflowed on this input (the model's logits are not finite): run with --dtype float32 (or bfloat16)"
    if dtype == torch.bfloat16:
        return "the model's logits are not finite in bfloat16: run with --dtype float32"
    return "the model's logits are not finite: the checkpoint's weights may hold NaN or inf values"
