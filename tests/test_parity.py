"""Numerical parity with the reference `PerceiverForMaskedLM` on random weights."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from perceiver_cli import masks, tokenizer
from perceiver_cli.checkpoint import FULL_SIZE_PARAMETERS, load_model
from perceiver_cli.filler import MaskFiller

from .conftest import FULL_SIZE, TINY, make_reference

ATOL = 1e-4

# Small configs that differ from each other and from the full size in every dimension.
SMALL_CONFIGS = {
    "tiny": TINY,
    "blocks2-wide": dict(
        num_latents=5, d_latents=48, d_model=24, num_blocks=2, num_self_attends_per_block=3,
        num_self_attention_heads=4, num_cross_attention_heads=3, qk_channels=None, v_channels=None,
        self_attention_widening_factor=2, cross_attention_widening_factor=3,
        max_position_embeddings=96, initializer_range=0.2,
    ),
    "q-shape-no-residual": dict(
        num_latents=12, d_latents=64, d_model=40, num_blocks=1, num_self_attends_per_block=4,
        num_self_attention_heads=8, num_cross_attention_heads=4, qk_channels=None, v_channels=64,
        cross_attention_shape_for_attention="q", use_query_residual=False,
        self_attention_widening_factor=3, cross_attention_widening_factor=2,
        max_position_embeddings=128, initializer_range=0.3,
    ),
}

TEXTS = [
    "Hello world, [MASK:3] is here.",
    "Größe: [MASK:4] — naïve café ☕ [MASK:2] end",  # multi-byte UTF-8 around and inside spans
    "[MASK:5] at the start, and at the end[MASK:1]",
]


def reference_logits(ref, ids: list[int], pad_to: int | None = None) -> torch.Tensor:
    """Reference logits at the first len(ids) positions, optionally padded as in the model card."""
    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    if pad_to:
        x = torch.nn.functional.pad(x, (0, pad_to - len(ids)), value=tokenizer.PAD)
        mask = torch.nn.functional.pad(mask, (0, pad_to - len(ids)), value=0)
    with torch.no_grad():
        return ref(inputs=x, attention_mask=mask).logits[0, : len(ids)]


def masked_ids(text: str) -> tuple[list[int], list[int]]:
    """Reference-style ids of `text` with its markers masked, and the masked positions."""
    filler_template = masks.parse(text)
    ids, positions = [tokenizer.CLS], []
    for piece, span in zip(filler_template.pieces, filler_template.spans):
        ids += [b + 6 for b in piece]
        positions += range(len(ids), len(ids) + span.length)
        ids += [tokenizer.MASK] * span.length
    ids += [b + 6 for b in filler_template.pieces[-1]] + [tokenizer.SEP]
    return ids, positions


def reference_fill(ref_logits: torch.Tensor, positions: list[int]) -> bytes:
    return bytes(ref_logits[positions, 6:].argmax(-1).tolist())


@pytest.fixture(scope="module", params=list(SMALL_CONFIGS))
def small(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    ref = make_reference(directory, seed=len(request.param), **SMALL_CONFIGS[request.param])
    return ref, load_model(directory), directory


def test_small_configs_logits_match_everywhere(small):
    ref, ours, _ = small
    g = torch.Generator().manual_seed(1)
    for n in (1, 7, 33, ours.cfg.max_position_embeddings):
        ids = torch.randint(0, ours.cfg.vocab_size, (n,), generator=g).tolist()
        expected = reference_logits(ref, ids)
        with torch.no_grad():
            got = ours(torch.tensor([ids]))[0]
        assert got.shape == expected.shape
        assert (got - expected).abs().max().item() <= ATOL, n


def test_small_configs_padded_reference_equals_unpadded_ours(small):
    ref, ours, _ = small
    ids, positions = masked_ids(TEXTS[0])
    expected = reference_logits(ref, ids, pad_to=ours.cfg.max_position_embeddings)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), positions=torch.tensor([positions]))[0]
    assert (got - expected[positions]).abs().max().item() <= ATOL


@pytest.mark.parametrize("text", TEXTS)
def test_oneshot_fills_equal_reference(small, text):
    ref, ours, _ = small
    ids, positions = masked_ids(text)
    expected = reference_fill(reference_logits(ref, ids), positions)
    result = MaskFiller(ours).fill(text, strategy="oneshot")
    assert b"".join(s.data for s in result.spans) == expected
    # every byte outside the spans is unchanged
    template = masks.parse(text)
    assert result.data == template.render([s.data for s in result.spans])


def test_num_blocks_repeats_the_same_layers(tmp_path):
    config = dict(SMALL_CONFIGS["blocks2-wide"])
    make_reference(tmp_path, **config)
    ours = load_model(tmp_path)
    assert len(ours.layers) == config["num_self_attends_per_block"]
    assert ours.cfg.num_blocks == 2


def test_batch_of_different_lengths_equals_each_alone(small):
    _, ours, _ = small
    texts = ["a[MASK:2]", "The [MASK:3] sat on the mat, and then [MASK:4] again.", TEXTS[1], "x [MASK:1] y"]
    filler = MaskFiller(ours, batch_size=4)
    together = filler.fill_many(texts)
    for text, res in zip(texts, together):
        alone = filler.fill(text)
        assert res.data == alone.data
        for a, b in zip(res.spans, alone.spans):
            assert abs(a.logprob - b.logprob) <= ATOL


def test_batched_logits_equal_single_logits(small):
    _, ours, _ = small
    texts = [TEXTS[0], TEXTS[1], "short [MASK:2]"]
    jobs = [masked_ids(t) for t in texts]
    runner_out = MaskFiller(ours, batch_size=3).runner(jobs)
    for (ids, positions), logp in zip(jobs, runner_out):
        with torch.no_grad():
            alone = torch.log_softmax(ours(torch.tensor([ids]), positions=torch.tensor([positions]))[0], -1)
        assert (logp - alone).abs().max().item() <= ATOL


def test_both_weight_formats_give_identical_logits(tmp_path):
    make_reference(tmp_path / "st", seed=3, safe=True, **TINY)
    make_reference(tmp_path / "bin", seed=3, safe=False, **TINY)
    assert (tmp_path / "st" / "model.safetensors").is_file()
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    assert not (tmp_path / "bin" / "model.safetensors").exists()
    ids = torch.tensor([masked_ids(TEXTS[0])[0]])
    with torch.no_grad():
        a = load_model(tmp_path / "st")(ids)
        b = load_model(tmp_path / "bin")(ids)
    assert torch.equal(a, b)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    directory = tmp_path_factory.mktemp("full")
    ref = make_reference(directory, seed=0, **FULL_SIZE)
    return ref, load_model(directory)


MODEL_CARD = "This is an incomplete sentence where some words are missing."


def test_full_size_parameter_count_and_model_card_positions(full_size):
    ref, ours = full_size
    assert ours.num_parameters() == FULL_SIZE_PARAMETERS
    assert sum(p.numel() for p in ref.parameters()) == FULL_SIZE_PARAMETERS
    text = "This is an incomplete sentence where some words are [MASK:9]"
    ids, positions = masked_ids(text)
    assert positions == list(range(52, 61))  # the model card masks input_ids[0, 52:61]
    card = [tokenizer.CLS] + [b + 6 for b in MODEL_CARD.encode()] + [tokenizer.SEP]
    card[52:61] = [tokenizer.MASK] * 9
    assert ids == card
    expected = reference_logits(ref, ids, pad_to=2048)  # exactly the model card's call
    with torch.no_grad():
        got = ours(torch.tensor([ids]), positions=torch.tensor([positions]))[0]
    assert (got - expected[positions]).abs().max().item() <= ATOL
    result = MaskFiller(ours).fill(text)
    assert result.spans[0].data == reference_fill(expected, positions)
    assert result.data == MODEL_CARD[:51].encode() + result.spans[0].data


def test_full_size_logits_match_at_every_position(full_size):
    ref, ours = full_size
    ids, _ = masked_ids("Größe [MASK:4] and more text, then [MASK:6]. The end.")
    expected = reference_logits(ref, ids)
    with torch.no_grad():
        got = ours(torch.tensor([ids]))[0]
    assert (got - expected).abs().max().item() <= ATOL


def test_loading_skips_random_init_and_never_imports_dynamo(tiny_checkpoint):
    """Built on the meta device, the layers skip their random init: nn.Embedding's alone
    would import torch._dynamo, seconds of every CLI start."""
    probe = subprocess.run([sys.executable, "-c", (
        "import sys\nfrom perceiver_cli.checkpoint import load_model\nload_model(sys.argv[1])\n"
        "print('torch._dynamo' in sys.modules)"
    ), str(tiny_checkpoint)], capture_output=True, text=True, timeout=120)
    assert probe.stdout == "False\n", probe.stderr

