"""Opt-in int8 inference: close to fp32, cached once, and refused where it cannot run."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from perceiver_cli.checkpoint import load_model, weights_file
from perceiver_cli.errors import InputError
from perceiver_cli.filler import MaskFiller
from perceiver_cli.quantize import Int8Linear, cache_dir, cache_path, quantize_int8

from .conftest import TINY, make_reference
from .hubserver import hub  # noqa: F401  (`hub` is a fixture)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def quantized(directory: Path, weights: Path | None = None):
    """The model of `directory` with int8 layers, its int8 cache keyed on `weights` (default: its own file)."""
    model = load_model(directory)
    note = quantize_int8(model, weights or weights_file(directory))
    return model, note


def int8_buffers(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith("weight_t")}


def test_int8_linear_is_close_to_fp32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)
    got = Int8Linear.from_linear(linear)(x)
    want = linear(x)
    assert got.shape == want.shape
    # per-token and per-channel int8: error well under 1% of the output scale
    assert (got - want).abs().max() < 0.01 * want.abs().max()


def test_quantized_model_swaps_the_latent_value_and_mlp_layers_and_agrees_with_fp32(tiny_checkpoint):
    fp32 = load_model(tiny_checkpoint)
    int8 = load_model(tiny_checkpoint)
    assert quantize_int8(int8, None) is None  # no weights file: quantized in memory, nothing cached
    assert not cache_dir().exists()
    swapped = sorted(n for n, m in int8.named_modules() if isinstance(m, Int8Linear))
    layers = len(fp32.layers)
    assert swapped == sorted(f"layers.{i}.{p}" for i in range(layers) for p in ("attn.v", "mlp.fc1", "mlp.fc2"))
    assert isinstance(int8.layers[0].attn.q, torch.nn.Linear)  # queries/keys stay fp32
    assert isinstance(int8.decoder_cross.attn.v, torch.nn.Linear)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(6, 262, (4, 40), generator=g)
    with torch.no_grad():
        a, b = fp32(ids), int8(ids)
    agree = (a[..., 6:].argmax(-1) == b[..., 6:].argmax(-1)).float().mean().item()
    assert agree >= 0.9


def test_int8_cache_is_written_once_with_the_usual_mode_and_read_back_identically(tiny_checkpoint, umask_022):
    first, note = quantized(tiny_checkpoint)
    assert note is None
    cache = cache_path(weights_file(tiny_checkpoint))
    assert cache.is_file() and cache.parent == cache_dir()
    assert [p.name for p in cache.parent.iterdir()] == [cache.name]  # written atomically: no temporary left
    assert cache.stat().st_mode & 0o777 == 0o644  # like the Hub's blobs under umask 022 (was 0600)
    mtime = cache.stat().st_mtime_ns
    second, _ = quantized(tiny_checkpoint)
    assert cache.stat().st_mtime_ns == mtime  # read, not rewritten
    ids = torch.randint(6, 262, (1, 30))
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))


def test_a_broken_int8_cache_is_rebuilt(tiny_checkpoint):
    cache = cache_path(weights_file(tiny_checkpoint))
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a safetensors file")
    assert quantized(tiny_checkpoint)[1] is None
    assert cache.stat().st_size > 100


@pytest.mark.parametrize("replace", ["in place", "renamed over"])
def test_a_same_size_replacement_with_its_mtime_copied_is_not_served_stale_int8_weights(tiny_checkpoint, tmp_path, replace):
    directory = tmp_path / "model"
    shutil.copytree(tiny_checkpoint, directory)
    other = tmp_path / "other"
    make_reference(other, seed=1, **TINY)  # the same shapes, other weights: the same file size
    weights = directory / "model.safetensors"
    assert weights.stat().st_size == (other / "model.safetensors").stat().st_size
    quantized(directory)  # caches the first weights' int8 copy
    st = weights.stat()
    if replace == "in place":
        weights.write_bytes((other / "model.safetensors").read_bytes())
    else:
        shutil.copyfile(other / "model.safetensors", tmp_path / "new")
        os.replace(tmp_path / "new", weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` or `touch -r` would
    got, _ = quantized(directory)
    want = load_model(other)
    quantize_int8(want, None)
    for name, tensor in int8_buffers(want).items():
        assert torch.equal(int8_buffers(got)[name], tensor), name


def test_hub_blobs_are_keyed_by_their_content_hash(hub, tiny_checkpoint):  # noqa: F811
    from perceiver_cli.hub import resolve

    hub.add("org/tiny", tiny_checkpoint)
    found = resolve("org/tiny", endpoint=hub.url)
    blob = found.weights.resolve()
    assert blob.parent.name == "blobs"
    quantized(found.directory)
    cache = cache_path(found.weights)
    mtime = cache.stat().st_mtime_ns
    blob.unlink()  # the blob downloaded anew: another inode and ctime, the same content hash
    hub.requests.clear()
    again = resolve("org/tiny", endpoint=hub.url, update=True)
    assert [r.file for r in hub.gets()] == ["model.safetensors"] and again.weights.resolve() == blob
    assert cache_path(again.weights) == cache
    quantized(again.directory)
    assert cache.stat().st_mtime_ns == mtime  # the int8 copy of the same content is used


def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("trouble", ["a file in the way", "disk full", "read-only"])
def test_an_int8_cache_that_cannot_be_written_gives_a_note_and_the_model_still_quantizes(
    tiny_checkpoint, monkeypatch, trouble
):
    home = Path(os.environ["HF_HOME"])
    if trouble == "a file in the way":
        home.mkdir()
        (home / "perceiver").write_text("not a folder")
    elif trouble == "disk full":
        import safetensors.torch

        monkeypatch.setattr(safetensors.torch, "save_file", _full_disk)
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders")
        home.mkdir()
        home.chmod(0o555)
    try:
        model, note = quantized(tiny_checkpoint)
    finally:
        if home.exists():
            home.chmod(0o755)
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 3 * len(model.layers)
    assert note and "\n" not in note and "int8" in note and "could not be cached" in note, note
    if cache_dir().is_dir():
        assert list(cache_dir().iterdir()) == []  # nothing half-written left behind

    filler = MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", quantize="int8")
    assert filler.notes == [note]  # the CLI shows it on stderr
    assert len(filler.fill("Hello [MASK:3] world").spans[0].data) == 3


def test_from_pretrained_int8_fills_and_uses_the_cache(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    filler = MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", quantize="int8")
    result = filler.fill("Hello [MASK:3] world")
    assert len(result.spans[0].data) == 3
    assert filler.notes == []
    cached = cache_path(weights_file(tiny_checkpoint))
    assert cached.is_file() and str(cached).startswith(str(tmp_path / "home"))


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps", "CUDA"])
def test_int8_is_refused_off_the_cpu_before_anything_loads(device):
    """Checked by the options, so no GPU is needed to prove it: no model is read."""
    with pytest.raises(InputError, match="int8 runs on the CPU only"):
        MaskFiller.from_pretrained("/nonexistent/never-read", device=device, quantize="int8")


def test_int8_bad_values_are_refused(tiny_checkpoint):
    with pytest.raises(InputError, match="quantize"):
        MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", quantize="int4")
    with pytest.raises(InputError, match="threads"):
        MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu", threads=0)
