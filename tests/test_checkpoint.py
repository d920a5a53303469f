"""Loading checkpoints that are damaged, hostile or old-fashioned: one clear line, or the model.

A config.json or weights file from outside is checked before anything is built: every config
value's type and bounds, every tensor's dtype, and the tensors the safetensors header lists
against the shapes the config implies.
"""

from __future__ import annotations

import ast
import json
import shutil
import signal
import sys
import tomllib
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from perceiver_cli.checkpoint import BinCopy, UnreadableWeights, load_model, reference_name
from perceiver_cli.errors import CheckpointError

from .conftest import TINY, RunsCode, make_reference

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def within(seconds: float):
    """Fail with TimeoutError instead of hanging when the block takes longer."""

    def expired(*_):
        raise TimeoutError(f"took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    directory = tmp_path / "ckpt"
    shutil.copytree(checkpoint, directory)
    return directory


def one_line_error(directory: Path) -> str:
    with within(20), pytest.raises(CheckpointError) as caught:
        load_model(directory)
    message = str(caught.value)
    assert "\n" not in message and "--model" not in message, message
    return message


# -- config.json ----------------------------------------------------------------------------

BAD_CONFIGS = {  # key changed -> the value config.json gets
    "num_blocks": 10**12,  # would loop for ever in the forward pass
    "num_self_attends_per_block": 10**9,  # would build 10**9 layers
    "d_model": "16",  # TypeError: empty()
    "d_latents": 0,
    "num_latents": -4,  # negative dimension
    "qk_channels": 0,  # ZeroDivisionError
    "num_self_attention_heads": 0,
    "num_cross_attention_heads": 2.0,
    "v_channels": True,
    "vocab_size": 100,  # the tokenizer uses 262 ids
    "max_position_embeddings": 2,  # no room for one byte between [CLS] and [SEP]
    "self_attention_widening_factor": None,
    "use_query_residual": "yes",
    "hidden_act": ["gelu"],
    "cross_attention_shape_for_attention": 3,
}


@pytest.mark.parametrize("key", BAD_CONFIGS)
def test_config_values_of_the_wrong_type_or_range_are_named(tiny_checkpoint, tmp_path, key):
    directory = copy_of(tiny_checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config[key] = BAD_CONFIGS[key]
    (directory / "config.json").write_text(json.dumps(config))
    message = one_line_error(directory)
    assert "config.json" in message and key in message, message


@pytest.mark.parametrize("text", ["[1, 2, 3]", "[" * 100_000 + "]" * 100_000, '"a string"', "{"])
def test_config_that_is_not_an_object_is_named(tiny_checkpoint, tmp_path, text):
    directory = copy_of(tiny_checkpoint, tmp_path)
    (directory / "config.json").write_text(text)
    assert "config.json" in one_line_error(directory)


def test_config_is_checked_against_the_weights_before_loading_them(tiny_checkpoint, tmp_path):
    directory = copy_of(tiny_checkpoint, tmp_path)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "num_self_attends_per_block": 200}))
    message = one_line_error(directory)
    assert "config.json says num_self_attends_per_block 200" in message and "holds 2 self-attention layers" in message

    (directory / "config.json").write_text(json.dumps({**config, "num_latents": 9}))
    message = one_line_error(directory)
    assert "perceiver.embeddings.latents" in message and "config.json" in message and "(8, 32)" in message


# -- weights --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.float64])
@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_weights_that_are_not_float_are_refused(tiny_checkpoint, tmp_path, dtype, weights):
    directory = copy_of(tiny_checkpoint, tmp_path)
    state = load_file(directory / "model.safetensors")
    name = "perceiver.embeddings.latents"
    state[name] = state[name].to(dtype)
    if weights == "model.safetensors":
        save_file(state, directory / weights)
    else:
        (directory / "model.safetensors").unlink()
        torch.save(state, directory / weights)
    message = one_line_error(directory)
    assert weights in message and name in message and str(dtype).removeprefix("torch.") in message, message


def test_float16_and_bfloat16_weights_load(tiny_checkpoint, tmp_path):
    directory = copy_of(tiny_checkpoint, tmp_path)
    state = load_file(directory / "model.safetensors")
    state = {k: v.to(torch.bfloat16 if i % 2 else torch.float16) for i, (k, v) in enumerate(state.items())}
    save_file(state, directory / "model.safetensors")
    loaded = load_model(directory).state_dict()
    assert {state[reference_name(name)].dtype for name in loaded} == {torch.float16, torch.bfloat16}
    for name, tensor in loaded.items():  # each tensor as it was saved: its own dtype, its values
        saved = state[reference_name(name)]
        assert tensor.dtype == saved.dtype and torch.equal(tensor, saved), name


def test_legacy_non_zip_bin_loads_from_a_local_directory(tiny_checkpoint, tmp_path):
    directory = tmp_path / "legacy"
    ref = make_reference(directory, safe=False, **TINY)
    torch.save(ref.state_dict(), directory / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    legacy = load_model(directory)
    expected = load_model(tiny_checkpoint)  # the same seed: the same weights
    for (name, a), (_, b) in zip(legacy.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(a, b), name


def test_local_bin_that_would_run_code_is_refused(tiny_checkpoint, tmp_path, capsys):
    directory = tmp_path / "code"
    directory.mkdir()
    shutil.copy(tiny_checkpoint / "config.json", directory)
    torch.save({"weight": torch.zeros(2), "payload": RunsCode()}, directory / "pytorch_model.bin")
    assert "could run code" in one_line_error(directory)
    assert "this ran" not in capsys.readouterr().out


def test_a_hub_bin_is_converted_once_and_fetched_again_when_unreadable(tiny_checkpoint, tmp_path):
    config = tiny_checkpoint / "config.json"
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    torch.save(load_file(tiny_checkpoint / "model.safetensors"), good)
    bad.write_bytes(good.read_bytes()[:100])  # cut off: not a torch file
    fetched = []

    def refetch():
        fetched.append(good)
        return good

    copy = BinCopy("org/bin", "0123456789abcdef0123", tmp_path / "copy")
    assert not copy.whole()
    assert copy.convert_download(config, bad, refetch) == copy.weights  # a cached .bin gone bad: once more
    assert fetched == [good] and copy.whole()
    converted, expected = load_model(copy.directory).state_dict(), load_model(tiny_checkpoint).state_dict()
    assert all(torch.equal(converted[name], tensor) for name, tensor in expected.items())
    copy.weights.write_bytes(copy.weights.read_bytes()[:-1])
    assert not copy.whole()  # a cut-off copy is converted again

    unreadable = "pytorch_model.bin of org/bin at commit 0123456789ab cannot be read as plain tensors"
    again = BinCopy("org/bin", "0123456789abcdef0123", tmp_path / "again")
    with pytest.raises(CheckpointError, match=unreadable):  # downloaded whole: bad in itself, not fetched again
        again.convert_download(config, bad, None)
    with pytest.raises(CheckpointError, match=unreadable):  # fetched once more, and still bad
        again.convert_download(config, bad, lambda: bad)
    with pytest.raises(UnreadableWeights):  # for hub.py to note a cached .bin as corrupted
        again.convert(config, bad)
    assert not again.whole()


# -- imports ----------------------------------------------------------------------------------


def test_the_package_imports_only_what_pyproject_declares():
    """httpx2 came in through hub.py without being declared: an install without it failed.
    An optional extra's packages (ray) count as declared; the test extra's do not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [dep for name, deps in project.get("optional-dependencies", {}).items() if name != "test" for dep in deps]
    declared = {dep.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip().lower().replace("-", "_")
                for dep in [*project["dependencies"], *extras]}
    undeclared = []
    for path in sorted((ROOT / "perceiver_cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top.lower() not in declared and top != "perceiver_cli":
                    undeclared.append(f"{path.name}: {name}")
    assert undeclared == []
