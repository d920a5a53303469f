"""A compact Perceiver IO masked language model.

It computes exactly what the reference implementation (transformers'
`PerceiverForMaskedLM`) computes for the same weights, with two differences that
change no result:

- the input is not padded to `max_position_embeddings`: the encoder attends to the
  real bytes only (padding is needed only to batch texts of different lengths, and
  the encoder mask makes it exact);
- the decoder runs only the queries of the positions the caller asks for. Decoder
  queries never attend to each other, so decoding a subset gives the same logits.

Modules come in dependency order: attention -> MLP -> layer -> model. Our own short
parameter names are translated from the reference layout by `checkpoint.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The decoder's attention shape is hard-coded by the reference (`PerceiverForMaskedLM`),
# whatever the config says.
DECODER_QK_CHANNELS = 8 * 32
DECODER_HEADS = 8


@dataclass
class PerceiverConfig:
    """Hyper-parameters; the defaults are those of `deepmind/language-perceiver`."""

    vocab_size: int = 262  # 256 bytes + 6 special ids ([PAD] [BOS] [EOS] [MASK] [CLS] [SEP])
    max_position_embeddings: int = 2048  # input and decoder position tables
    d_model: int = 768  # width of byte embeddings and decoder queries
    num_latents: int = 256  # the latent array the encoder compresses the input into
    d_latents: int = 1280  # width of each latent
    num_blocks: int = 1  # times the SAME self-attention stack is applied (shared weights)
    num_self_attends_per_block: int = 26  # self-attention layers in the stack
    num_self_attention_heads: int = 8
    num_cross_attention_heads: int = 8
    qk_channels: int | None = 256  # None: derived as the reference does (see below)
    v_channels: int | None = 1280  # None: derived as the reference does
    cross_attention_shape_for_attention: str = "kv"  # which side sizes qk when qk_channels is None
    self_attention_widening_factor: int = 1  # MLP hidden = factor * width
    cross_attention_widening_factor: int = 1
    use_query_residual: bool = True  # encoder cross-attention adds its query (the latents)
    hidden_act: str = "gelu"  # exact (erf) GELU; the only activation the checkpoint uses

    @classmethod
    def from_dict(cls, d: dict) -> "PerceiverConfig":
        """Build from a reference `config.json` dict; unknown keys are ignored.

        Every value is checked (type and bounds, see `validate`) before anything is built: a
        bad one raises ValueError naming its key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object of settings, not {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "PerceiverConfig":
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except RecursionError:
            raise ValueError("it is nested too deeply to be a config") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    # Channel counts resolved exactly as the reference resolves them.
    @property
    def encoder_cross_qk(self) -> int:
        if self.qk_channels is not None:
            return self.qk_channels
        return self.d_latents if self.cross_attention_shape_for_attention == "q" else self.d_model

    @property
    def encoder_cross_v(self) -> int:
        return self.v_channels if self.v_channels is not None else self.encoder_cross_qk

    @property
    def self_qk(self) -> int:
        return self.qk_channels if self.qk_channels is not None else self.d_latents

    @property
    def self_v(self) -> int:
        return self.v_channels if self.v_channels is not None else self.self_qk

    def validate(self) -> None:
        """Raise ValueError, naming the key, for a value of the wrong type or out of bounds.

        The bounds are generous (the full-size model is far inside them) but keep a hostile
        config.json from asking for 10**9 layers or a zero-width tensor before any weight is
        read; the weights file is then checked against the shapes this config implies.
        """
        for name, lo, hi in _BOUNDS:
            value = getattr(self, name)
            if value is None and name in ("qk_channels", "v_channels"):
                continue
            if type(value) is not int:
                raise ValueError(f"{name} must be a whole number (got {_shown(value)})")
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be between {lo} and {hi} (got {value})")
        if type(self.use_query_residual) is not bool:
            raise ValueError(f"use_query_residual must be true or false (got {_shown(self.use_query_residual)})")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act must be 'gelu', the only activation supported (got {_shown(self.hidden_act)})")
        if self.cross_attention_shape_for_attention not in ("q", "kv"):
            raise ValueError(
                f"cross_attention_shape_for_attention must be 'q' or 'kv' (got {_shown(self.cross_attention_shape_for_attention)})"
            )
        for name, width in (("self_attention_widening_factor", self.d_latents), ("cross_attention_widening_factor", self.d_latents)):
            if getattr(self, name) * width > MAX_WIDTH:
                raise ValueError(f"{name} makes an MLP wider than {MAX_WIDTH} (d_latents {width} x {getattr(self, name)})")
        if self.self_v != self.d_latents:
            raise ValueError("v_channels must equal d_latents (the self-attention residual needs it)")
        checks = [
            ("qk_channels", self.encoder_cross_qk, "num_cross_attention_heads", self.num_cross_attention_heads),
            ("v_channels", self.encoder_cross_v, "num_cross_attention_heads", self.num_cross_attention_heads),
            ("qk_channels", self.self_qk, "num_self_attention_heads", self.num_self_attention_heads),
            ("v_channels", self.self_v, "num_self_attention_heads", self.num_self_attention_heads),
            ("d_model", self.d_model, "the decoder's heads", DECODER_HEADS),
        ]
        for name, channels, heads_name, heads in checks:
            if channels % heads:
                raise ValueError(f"{name}: {channels} channels are not divisible by {heads} heads ({heads_name})")


MAX_WIDTH = 1 << 16  # channels of any one layer
MAX_LAYERS = 256  # num_self_attends_per_block (the full-size model has 26)
MAX_BLOCKS = 64  # num_blocks: passes through the shared stack (the full-size model makes 1)
# (field, lowest, highest) of every whole-number setting
_BOUNDS = (
    ("vocab_size", 262, MAX_WIDTH),  # 256 bytes + 6 special ids: the tokenizer uses all 262
    ("max_position_embeddings", 3, 1 << 16),  # [CLS] + at least one byte + [SEP]
    ("d_model", 1, MAX_WIDTH),
    ("num_latents", 1, MAX_WIDTH),
    ("d_latents", 1, MAX_WIDTH),
    ("num_blocks", 1, MAX_BLOCKS),
    ("num_self_attends_per_block", 1, MAX_LAYERS),
    ("num_self_attention_heads", 1, MAX_WIDTH),
    ("num_cross_attention_heads", 1, MAX_WIDTH),
    ("qk_channels", 1, MAX_WIDTH),
    ("v_channels", 1, MAX_WIDTH),
    ("self_attention_widening_factor", 1, MAX_WIDTH),
    ("cross_attention_widening_factor", 1, MAX_WIDTH),
)


def _shown(value) -> str:
    """A config value for an error message: short, one line."""
    text = repr(value)
    return text if len(text) <= 40 else f"a {type(value).__name__}"


class Attention(nn.Module):
    """Multi-head attention with pre-LayerNorm, as the reference's `PerceiverAttention`.

    Cross-attention (kv_dim given) normalises query and context separately; self-attention
    takes keys and values from the normalised query input.
    """

    def __init__(self, q_dim: int, kv_dim: int | None, qk: int, v: int, out: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_q = nn.LayerNorm(q_dim)  # reference eps is PyTorch's default 1e-5
        self.ln_kv = nn.LayerNorm(kv_dim) if kv_dim is not None else None
        kv_in = kv_dim if kv_dim is not None else q_dim
        self.q = Linear(q_dim, qk)
        self.k = Linear(kv_in, qk)
        self.v = Linear(kv_in, v)
        self.o = Linear(v, out)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        # x: (B, M, q_dim); ctx: (B, N, kv_dim) or None; bias: (B, 1, 1, N), dtype-min on padding
        B, M, _ = x.shape
        x = self.ln_q(x)
        ctx = x if self.ln_kv is None else self.ln_kv(ctx)
        q = _split_heads(self.q(x), self.heads)  # (B*h, M, qk/h)
        k = _split_heads(self.k(ctx), self.heads)  # (B*h, N, qk/h)
        v = _split_heads(self.v(ctx), self.heads)  # (B*h, N, v/h)
        # The reference's arithmetic: product, then divide by sqrt(d), then the additive mask.
        scores = torch.bmm(q, k.transpose(1, 2)).div_(math.sqrt(q.shape[-1]))  # (B*h, M, N)
        if bias is not None:
            scores = (scores.view(B, self.heads, M, -1) + bias).view(B * self.heads, M, -1)
        y = torch.bmm(scores.softmax(-1), v)  # (B*h, M, v/h)
        y = y.view(B, self.heads, M, -1).transpose(1, 2).reshape(B, M, -1)  # (B, M, v)
        return self.o(y)  # (B, M, out)


class _NoMetaInit:
    """Skips a layer's random init on the meta device, where the checkpoint's weights
    replace it anyway: for nn.Embedding that init alone imports torch._dynamo (seconds of
    every CLI start), for the 168 nn.Linear layers it costs ~30 ms."""

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            super().reset_parameters()


class Linear(_NoMetaInit, nn.Linear):
    pass


class Embedding(_NoMetaInit, nn.Embedding):
    pass


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, T, heads*d) -> (B*heads, T, d); a view without a copy when B == 1."""
    B, T, C = t.shape
    return t.view(B, T, heads, C // heads).transpose(1, 2).reshape(B * heads, T, C // heads)


class MLP(nn.Module):
    def __init__(self, dim: int, widening: int):
        super().__init__()
        self.fc1 = Linear(dim, widening * dim)
        self.fc2 = Linear(widening * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact GELU, as ACT2FN["gelu"]


class Layer(nn.Module):
    """Attention (+ optional query residual), then LayerNorm + MLP + residual."""

    def __init__(self, attn: Attention, dim: int, widening: int, query_residual: bool):
        super().__init__()
        self.attn = attn
        self.query_residual = query_residual
        self.ln = nn.LayerNorm(dim)
        self.mlp = MLP(dim, widening)

    def forward(self, x, ctx=None, bias=None):
        y = self.attn(x, ctx, bias)
        if self.query_residual:
            y = y + x
        return y + self.mlp(self.ln(y))


class PerceiverMaskedLM(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.d_model)  # tied to the output projection
        self.pos_embed = Embedding(cfg.max_position_embeddings, cfg.d_model)
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, cfg.d_latents))
        cross = Attention(
            cfg.d_latents, cfg.d_model, cfg.encoder_cross_qk, cfg.encoder_cross_v,
            cfg.d_latents, cfg.num_cross_attention_heads,
        )
        self.encoder_cross = Layer(cross, cfg.d_latents, cfg.cross_attention_widening_factor, cfg.use_query_residual)
        self.layers = nn.ModuleList(
            Layer(
                Attention(cfg.d_latents, None, cfg.self_qk, cfg.self_v, cfg.self_v, cfg.num_self_attention_heads),
                cfg.d_latents, cfg.self_attention_widening_factor, query_residual=True,
            )
            for _ in range(cfg.num_self_attends_per_block)
        )
        self.queries = nn.Parameter(torch.empty(cfg.max_position_embeddings, cfg.d_model))
        dec = Attention(cfg.d_model, cfg.d_latents, DECODER_QK_CHANNELS, cfg.d_model, cfg.d_model, DECODER_HEADS)
        self.decoder_cross = Layer(dec, cfg.d_model, 1, query_residual=False)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def encode(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids: (B, N) token ids; mask: (B, N) bool, True on real tokens. Returns z (B, L, d_latents)."""
        B, N = ids.shape
        x = self.embed(ids) + self.pos_embed.weight[:N]  # (B, N, d_model)
        bias = None
        if mask is not None:  # padding gets the dtype's minimum, as in the reference
            bias = (~mask[:, None, None, :]).to(x.dtype) * torch.finfo(x.dtype).min  # (B, 1, 1, N)
        z = self.encoder_cross(self.latents.expand(B, -1, -1), x, bias)  # (B, L, d_latents)
        for _ in range(self.cfg.num_blocks):  # num_blocks repeats the same layers
            for layer in self.layers:
                z = layer(z)
        return z

    def decode(self, z: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """z: (B, L, d_latents); positions: (B, M) long. Returns logits (B, M, vocab)."""
        q = self.queries[positions]  # (B, M, d_model)
        y = self.decoder_cross(q, z)  # (B, M, d_model)
        return y @ self.embed.weight.T + self.out_bias  # (B, M, vocab)

    def forward(self, ids, mask=None, positions=None):
        """Logits at `positions` (B, M); all input positions when None."""
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape[0], -1)
        return self.decode(self.encode(ids, mask), positions)

    @property
    def device(self) -> torch.device:
        """Where the weights live (the one place a filler learns its device from)."""
        return self.out_bias.device

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
