"""Train a small Perceiver IO masked byte LM (our own model code) on the corpus of
`scripts/build_corpus.py`, on CPU, within a wall-clock budget.

    nohup nice -n 19 python scripts/train_small.py --minutes 55 --out runs/small \
        > runs/train.log 2>&1 &

    # the shipped model's second stage (QUALITY.md): continue it with a fresh optimizer
    nohup nice -n 19 python scripts/train_small.py --init tests/assets/perceiver-small \
        --threads 1 --minutes 85 --lr 6e-4 --warmup 100 --out runs/longer > runs/longer.log 2>&1 &

    # the third stage (issue 15): continue the second stage's best
    # checkpoint with 30% of the examples holding one padded word region (--padded)
    nohup nice -n 19 python scripts/train_small.py --init runs/longer/best --threads 2 \
        --minutes 75 --lr 5e-4 --warmup 100 --padded 0.3 --out runs/stage3 > runs/stage3.log 2>&1 &

    # the fourth stage (shipped since): the third's best, a lower peak, more padded regions
    nohup nice -n 19 python scripts/train_small.py --init runs/stage3/best --threads 2 \
        --minutes 80 --lr 3e-4 --warmup 100 --padded 0.4 --out runs/stage4 > runs/stage4.log 2>&1 &

The architecture is `perceiver_cli.model.PerceiverMaskedLM` unchanged: byte vocabulary,
`[CLS] bytes [SEP]` inputs, masked positions given the `[MASK]` id. Checkpoints are saved
in the reference layout (`config.json` + `model.safetensors`, via
`checkpoint.save_reference`) to `OUT/checkpoint/` every `--save-every` minutes and at the
end, so the loader and the CLI read them as they read `deepmind/language-perceiver`; the
checkpoint with the lowest whole-word validation loss seen at an evaluation also goes to
`OUT/best/`.

`--init DIR` continues an existing checkpoint in the reference layout (for example the
shipped `tests/assets/perceiver-small`) instead of starting from the routing init: its
config is used (`--context/--width/--layers/--heads/--widening` are ignored), the optimizer
starts fresh, and the schedule is the same warm-up + cosine over `--minutes` (give it a
lower `--lr` than a run from scratch). `--device auto` (the default) trains on a CUDA GPU
when torch sees one, otherwise on the CPU; on the CPU the run is exactly what it was
before the option existed (same random streams, same steps).

Why the unusual initialisation ("routing init"): from the default random init a small
Perceiver sits at the unigram loss for a long time, because the latent bottleneck has to
discover how to route input positions to latents. Here there are as many latents as
positions, and the latents, the input position embeddings and the decoder queries start
as the same table; the cross-attentions start as (scaled) identity projections, so latent
i attends to input position i and decoder query i reads latent i from the first step.
The position table is noise smoothed along the positions, so neighbouring positions
have similar embeddings: latent i starts out reading bytes i-2..i+2 (mostly i), which
gives every masked byte some context before the self-attention stack has learnt to mix
it (with white-noise positions the 128-position model sat at the unigram loss for the
first 250 steps, see QUALITY.md).

Masking, as the real model's pretraining: ~15% of the words, each masked as a whole
span that starts with the space before it. For half of the masked words a random part of
the word's bytes is shown again (the loss is on the still-masked bytes only), so that the
model also learns to complete partly filled words, which iterative decoding relies on.
A few single bytes elsewhere are masked too. With `--padded`, a share of the examples
also hold one word masked as a region of `--pad-to` bytes (`max_span`, 16), the word
followed by spaces: the region the auto-length probe masks for a `[MASK]`, so that the
model learns where a word in it ends (without it, every masked region in training is
exactly one word, and the probe's word-end probabilities say nothing).

The learning curve (step, minutes, learning rate, train loss, validation loss per masked
byte with single-byte masks and with whole-word masks) goes to `OUT/curve.csv`.
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from perceiver_cli import tokenizer
from perceiver_cli.checkpoint import load_model, save_reference
from perceiver_cli.model import PerceiverConfig, PerceiverMaskedLM

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")
_WORD = re.compile(rb" [A-Za-z0-9]+")


def small_config(args) -> PerceiverConfig:
    d = args.width
    return PerceiverConfig(
        max_position_embeddings=args.context, d_model=d, num_latents=args.context, d_latents=d,
        num_self_attends_per_block=args.layers, num_self_attention_heads=args.heads,
        num_cross_attention_heads=args.heads, qk_channels=d, v_channels=d,
        self_attention_widening_factor=args.widening, cross_attention_widening_factor=args.widening,
    )


def _eye(out_features: int, in_features: int, scale: float = 1.0) -> torch.Tensor:
    w = torch.zeros(out_features, in_features)
    n = min(out_features, in_features)
    w[:n, :n] = torch.eye(n) * scale
    return w


def _smooth_noise(n: int, d: int, sigma: float) -> torch.Tensor:
    """(n, d) std-1 rows; rows i and j correlate as exp(-(i-j)^2 / (4 sigma^2)) (0: white noise)."""
    if sigma <= 0:
        return torch.randn(n, d)
    r = int(4 * sigma) + 1
    k = torch.exp(-torch.arange(-r, r + 1).float() ** 2 / (2 * sigma**2))
    noise = torch.randn(1, d, n + 2 * r)
    x = F.conv1d(noise.transpose(0, 1), k.view(1, 1, -1)).transpose(0, 1)[0].T  # (n, d)
    return x / x.std()


@torch.no_grad()
def routing_init(model: PerceiverMaskedLM, sharpness: float, out_scale: float, smooth: float) -> None:
    """Position i -> latent i -> decoder query i from the start (see the module docstring)."""
    cfg = model.cfg
    layers = cfg.num_self_attends_per_block
    for name, p in model.named_parameters():
        if p.dim() == 2 and name.startswith("layers."):
            std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.o.weight", "mlp.fc2.weight")) else 0.02
            p.normal_(0.0, std)
        elif name.endswith(".bias") and "ln" not in name:
            p.zero_()
    # Byte and position embeddings at std 1: Adam moves every parameter by ~lr per step,
    # so small tables would lose their routing structure within a few dozen steps.
    model.embed.weight.normal_(0.0, 1.0)
    pos = _smooth_noise(cfg.max_position_embeddings, cfg.d_model, smooth)
    model.pos_embed.weight.copy_(pos)
    model.queries.copy_(pos)
    model.latents.copy_(pos[: cfg.num_latents])  # d_latents == d_model, num_latents == positions
    for layer in (model.encoder_cross, model.decoder_cross):
        a = layer.attn
        a.q.weight.copy_(_eye(*a.q.weight.shape, scale=sharpness))
        a.k.weight.copy_(_eye(*a.k.weight.shape))
        a.v.weight.copy_(_eye(*a.v.weight.shape))
        a.o.weight.copy_(_eye(*a.o.weight.shape, scale=out_scale if layer is model.decoder_cross else 1.0))
        layer.mlp.fc1.weight.normal_(0.0, 0.02)
        layer.mlp.fc2.weight.zero_()
    model.out_bias.zero_()


class Corpus:
    """Training examples: runs of whole sentences of one paragraph, at most `n` bytes."""

    def __init__(self, path: Path, n: int):
        self.n = n
        self.paragraphs = []
        for line in path.read_text(encoding="utf-8").splitlines():
            sents = [s.encode() for s in _SENTENCE_END.split(line.strip()) if s.strip()]
            if sents:
                self.paragraphs.append(sents)
        weights = [sum(len(s) for s in p) for p in self.paragraphs]
        total = sum(weights)
        self.cum = []
        acc = 0
        for w in weights:
            acc += w
            self.cum.append(acc / total)

    def sample(self, rng: random.Random, n: int | None = None) -> bytes:
        import bisect

        n = n or self.n
        para = self.paragraphs[min(bisect.bisect(self.cum, rng.random()), len(self.paragraphs) - 1)]
        i = rng.randrange(len(para))
        text = para[i]
        if len(text) > n:  # a long sentence: a window that starts at a word
            starts = [0] + [m.start() for m in re.finditer(rb" ", text[: len(text) - n // 2])]
            s = rng.choice(starts)
            text = text[s:].lstrip()[: n]
            cut = text.rfind(b" ")
            return text[:cut] if cut > n // 2 else text
        for nxt in para[i + 1 :]:
            if len(text) + 1 + len(nxt) > n or rng.random() < 0.3:
                break
            text += b" " + nxt
        return text


def mask_example(text: bytes, rng: random.Random, words: float, partial: float, single: float,
                 pad_to: int = 0):
    """(ids, targets): ids with masked positions set to [MASK]; targets -100 where unmasked.

    With `pad_to`, one word (space included, at most `pad_to` bytes) is masked as a region
    of exactly `pad_to` bytes: the word, then spaces up to `pad_to` (inserted, so the text
    after it is unchanged). That is what the auto-length probe shows the model
    (`perceiver_cli/lengths.py`: `max_span` masked bytes per `[MASK]`), so the model learns
    where the word in such a region ends. The text must leave room: at most
    (positions - pad_to) bytes.
    """
    ids = tokenizer.encode(text)
    targets = [-100] * len(ids)
    spans = [(m.start(), m.end()) for m in _WORD.finditer(text)]
    padded = None
    if pad_to:
        fits = [s for s in spans if s[1] - s[0] <= pad_to]
        if fits:
            padded = rng.choice(fits)
            spans.remove(padded)
    chosen = [s for s in spans if rng.random() < words]
    if not chosen and spans and words > 0:
        chosen = [rng.choice(spans)]
    for a, b in chosen:
        keep = [False] * (b - a)
        if rng.random() < partial and b - a > 1:
            p = rng.random()
            keep = [rng.random() < p for _ in range(b - a)]
            if all(keep):
                keep[rng.randrange(b - a)] = False
        for k, j in enumerate(range(a, b)):
            if not keep[k]:
                targets[j + 1] = ids[j + 1]
                ids[j + 1] = tokenizer.MASK
    for j in range(1, len(ids) - 1):
        if targets[j] == -100 and rng.random() < single:
            targets[j] = ids[j]
            ids[j] = tokenizer.MASK
    if padded is not None:
        a, b = padded
        for j in range(a + 1, b + 1):
            targets[j], ids[j] = ids[j], tokenizer.MASK
        fill = pad_to - (b - a)
        ids[b + 1 : b + 1] = [tokenizer.MASK] * fill
        targets[b + 1 : b + 1] = [tokenizer.byte_id(ord(" "))] * fill
    if all(t == -100 for t in targets):  # always something to predict
        j = rng.randrange(1, len(ids) - 1)
        targets[j], ids[j] = ids[j], tokenizer.MASK
    return ids, targets


def example(corpus: Corpus, rng: random.Random, args) -> tuple[list[int], list[int]]:
    """One training example; a share `--padded` of them with a padded word region."""
    if args.padded and rng.random() < args.padded:
        text = corpus.sample(rng, corpus.n - args.pad_to)
        return mask_example(text, rng, args.words, args.partial, args.single, pad_to=args.pad_to)
    return mask_example(corpus.sample(rng), rng, args.words, args.partial, args.single)


def collate(examples):
    """Padded (ids, mask, positions, targets): only the masked positions are decoded."""
    n = max(len(ids) for ids, _ in examples)
    masked = [[j for j, t in enumerate(tg) if t != -100] for _, tg in examples]
    m = max(len(p) for p in masked)
    ids = torch.full((len(examples), n), tokenizer.PAD, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.bool)
    pos = torch.zeros((len(examples), m), dtype=torch.long)
    tgt = torch.full((len(examples), m), -100, dtype=torch.long)
    for r, ((i, t), p) in enumerate(zip(examples, masked)):
        ids[r, : len(i)] = torch.tensor(i)
        mask[r, : len(i)] = True
        pos[r, : len(p)] = torch.tensor(p)
        tgt[r, : len(p)] = torch.tensor([t[j] for j in p])
    return ids, mask, pos, tgt


def to_device(batch, device):
    return tuple(t.to(device, non_blocking=True) for t in batch) if device.type != "cpu" else batch


def initial_model(args) -> PerceiverMaskedLM:
    """A fresh model with the routing init, or (--init) a trainable copy of a checkpoint."""
    if args.init:
        loaded = load_model(args.init)  # memory-mapped, frozen: copy into a fresh trainable model
        model = PerceiverMaskedLM(loaded.cfg)
        model.load_state_dict({k: v.detach().clone() for k, v in loaded.state_dict().items()})
        return model.train().requires_grad_(True)
    cfg = small_config(args)
    cfg.validate()
    model = PerceiverMaskedLM(cfg)
    routing_init(model, args.sharpness, args.out_scale, args.pos_smooth)
    return model


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA GPU")
    return torch.device(name)


def loss_of(model, batch, reduction="mean"):
    ids, mask, pos, tgt = batch
    logits = model(ids, mask, pos)  # (B, M, V) at the masked positions only
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                           reduction=reduction)


@torch.no_grad()
def evaluate(model, batches) -> float:
    """Mean loss per masked byte, nats."""
    model.eval()
    total = sum(loss_of(model, b, "sum").item() for b in batches)
    count = sum(int((b[3] != -100).sum()) for b in batches)
    model.train()
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--out", default="runs/small")
    ap.add_argument("--minutes", type=float, default=55.0, help="training budget, minutes of running time")
    ap.add_argument("--context", type=int, default=128, help="positions = latents (126 bytes + [CLS] [SEP])")
    ap.add_argument("--width", type=int, default=192, help="d_model = d_latents")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--widening", type=int, default=1)
    ap.add_argument("--sharpness", type=float, default=2.0, help="scale of the identity query projections")
    ap.add_argument("--pos-smooth", type=float, default=1.5,
                    help="position embeddings start as noise smoothed along positions (correlation length, "
                         "positions): latent i then reads bytes i-2..i+2, a local context from the first step")
    ap.add_argument("--out-scale", type=float, default=0.05,
                    help="decoder output projection starts as this times identity: moderate first logits "
                         "(they are products with the std-1 byte embeddings)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--words", type=float, default=0.15, help="share of words masked")
    ap.add_argument("--partial", type=float, default=0.5, help="share of masked words partly shown again")
    ap.add_argument("--single", type=float, default=0.03, help="share of other bytes masked singly")
    ap.add_argument("--padded", type=float, default=0.0,
                    help="share of examples with one word masked as a region of --pad-to bytes, the word "
                         "then spaces (the auto-length probe's view, see mask_example)")
    ap.add_argument("--pad-to", type=int, default=16, help="the probe's region: FillOptions.max_span")
    ap.add_argument("--eval-every", type=float, default=3.0, help="minutes")
    ap.add_argument("--save-every", type=float, default=5.0, help="minutes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", default=None, metavar="DIR",
                    help="continue this checkpoint (reference layout) instead of the routing init")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                    help="auto: CUDA when torch sees a GPU, else the CPU")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    device = pick_device(args.device)
    model = initial_model(args).to(device)
    cfg = model.cfg
    print(f"device: {device}" + (f", init: {args.init}" if args.init else ""), flush=True)
    print(f"config: {cfg.to_dict()}", flush=True)
    print(f"parameters: {model.num_parameters():,}", flush=True)

    corpus = Corpus(Path(args.corpus) / "train.txt", args.context - 2)
    valid = Corpus(Path(args.corpus) / "valid.txt", args.context - 2)
    vrng = random.Random(1234)
    vtexts = [valid.sample(vrng) for _ in range(256)]
    val_bytes = [collate([mask_example(t, vrng, 0.0, 0.0, 0.15) for t in vtexts[i : i + 64]]) for i in range(0, 256, 64)]
    val_words = [collate([mask_example(t, vrng, 0.15, 0.0, 0.0) for t in vtexts[i : i + 64]]) for i in range(0, 256, 64)]
    val_bytes = [to_device(b, device) for b in val_bytes]
    val_words = [to_device(b, device) for b in val_words]

    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith(("layers.", "encoder_cross.", "decoder_cross."))]
    no_decay = [p for n, p in model.named_parameters() if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98))

    budget = args.minutes * 60
    running = 0.0  # seconds of running time (a pause by SIGSTOP is not counted)
    last_eval = last_save = 0.0
    step, ema = 0, None
    curve = open(out / "curve.csv", "w", newline="")
    writer = csv.writer(curve)
    writer.writerow(["step", "minutes", "lr", "train_loss", "val_bytes", "val_words"])

    best = float("inf")

    def log_eval():
        nonlocal best
        vb, vw = evaluate(model, val_bytes), evaluate(model, val_words)
        if vw < best:
            best = vw
            save_reference(model, out / "best")
        writer.writerow([step, round(running / 60, 2), f"{lr:.2e}", round(ema or float("nan"), 4), round(vb, 4), round(vw, 4)])
        curve.flush()
        print(f"step {step} min {running / 60:.1f} lr {lr:.2e} train {ema or float('nan'):.3f} "
              f"val_bytes {vb:.3f} val_words {vw:.3f}", flush=True)

    lr = args.lr
    log_eval()
    while running < budget:
        t0 = time.monotonic()
        frac = running / budget
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = collate([example(corpus, rng, args) for _ in range(args.batch)])
        loss = loss_of(model, to_device(batch, device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        running += min(time.monotonic() - t0, 30.0)  # a step longer than 30 s was paused
        if running - last_eval >= args.eval_every * 60:
            last_eval = running
            log_eval()
        if running - last_save >= args.save_every * 60:
            last_save = running
            save_reference(model, out / "checkpoint")
        if step % 50 == 0:
            print(f"step {step} min {running / 60:.1f} loss {ema:.3f}", flush=True)
    log_eval()
    save_reference(model, out / "checkpoint")
    curve.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
