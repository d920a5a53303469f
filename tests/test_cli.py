"""The `perceiver fill` command (README.md, Filling text), on a tiny random checkpoint.

In-process through `typer.testing.CliRunner` for most behaviours, and through real
subprocesses for what only a real process shows: pipes, a closed pipe, a terminal,
Ctrl-C, exit codes, and `--help` not importing torch. The subprocess scenarios start
together in one module fixture (each start imports torch: seconds) and are checked by
separate tests.
"""

from __future__ import annotations

import gc
import io
import json
import os
import pty
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from perceiver_cli import cli, masks, render
from perceiver_cli.cli import app
from perceiver_cli.options import LoadOptions
from perceiver_cli.filler import MaskFiller

from .conftest import TINY, ctrl_c_reaches_it, perceiver, process_env, read_pty, run_process, wait_until_blocked

WINDOW = TINY["max_position_embeddings"] - 2  # bytes of document per model input ([CLS] and [SEP] take 2)
ANSI = b"\x1b["
MODES = ["argument", "stdin", "dash"]

DOC = "The cat sat on[MASK:4] mat, and then [MASK] ran away."
MULTILINE = "first line [MASK:3] here\nsecond line, unchanged\n\n\tthird [MASK:2]!\r\nend [MASK:5]\n"




pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def filler(tiny_checkpoint) -> MaskFiller:
    """The library the command calls, to compute what the command must print."""
    return MaskFiller.from_pretrained(str(tiny_checkpoint), device="cpu")


def invoke(checkpoint: Path, *args: str, stdin: bytes | str | None = None, env: dict | None = None):
    return CliRunner().invoke(app, ["fill", "-m", str(checkpoint), *args], input=stdin, env=env, prog_name="perceiver")


def run_mode(checkpoint: Path, mode: str, document: str, *args: str):
    """`fill` with the document as the argument, on stdin (no argument) or on stdin via `-`."""
    if mode == "argument":
        return invoke(checkpoint, *args, document)
    data = masks.to_bytes(document)
    return invoke(checkpoint, *args, *(["-"] if mode == "dash" else []), stdin=data)


def rebuild(document: str, fills: list[bytes]) -> bytes:
    """The document with its spans replaced by `fills`, every other byte as it was."""
    return masks.parse(document).render(fills)


def assert_one_error_line(result, fragment: str) -> None:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# -- input modes and plain output -------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_plain_output_in_every_input_mode(tiny_checkpoint, filler, mode):
    result = run_mode(tiny_checkpoint, mode, DOC)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    expected = filler.fill(DOC).data
    # the argument form ends its line like echo; stdin is reproduced byte for byte
    assert result.stdout_bytes == (expected + b"\n" if mode == "argument" else expected)
    assert ANSI not in result.stdout_bytes


@pytest.mark.parametrize("mode", ["stdin", "dash"])
def test_multiline_stdin_is_one_document_with_every_other_byte_kept(tiny_checkpoint, filler, mode):
    result = run_mode(tiny_checkpoint, mode, MULTILINE)
    assert result.exit_code == 0, result.stderr
    spans = filler.fill(MULTILINE).spans
    assert [len(s.data) for s in spans] == [3, 2, 5]
    assert result.stdout_bytes == rebuild(MULTILINE, [s.data for s in spans])
    out_lines = result.stdout_bytes.split(b"\n")
    in_lines = MULTILINE.encode().split(b"\n")
    assert len(out_lines) == len(in_lines)
    assert out_lines[1:3] == in_lines[1:3]  # lines without a marker come out unchanged
    assert out_lines[3].endswith(b"!\r") and out_lines[-1] == b""  # CRLF and the final newline kept


def test_no_trailing_newline_is_added_to_stdin(tiny_checkpoint):
    result = invoke(tiny_checkpoint, stdin=b"no newline at the end [MASK:2]")
    assert result.exit_code == 0
    assert not result.stdout_bytes.endswith(b"\n")
    assert result.stdout_bytes.startswith(b"no newline at the end")
    assert len(result.stdout_bytes) == len(b"no newline at the end") + 2  # the space went into the span


def test_mask_token_option(tiny_checkpoint, filler):
    doc = "a <mask:3> b <mask> c [MASK:2] stays"
    result = invoke(tiny_checkpoint, "--mask-token", "<mask>", doc)
    assert result.exit_code == 0, result.stderr
    expected = filler.fill(doc, mask_token="<mask>")
    assert result.stdout_bytes == expected.data + b"\n"
    assert result.stdout_bytes.endswith(b" c [MASK:2] stays\n")  # the default literal is plain text now


# -- --json -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_json_object_field_by_field(tiny_checkpoint, filler, mode):
    result = run_mode(tiny_checkpoint, mode, DOC, "--json", "-k", "3")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.count("\n") == 1  # one line
    obj = json.loads(result.stdout)
    expected = filler.fill(DOC, top_k=3)
    assert set(obj) == {"text", "spans"}
    assert obj["text"] == expected.text
    assert len(obj["spans"]) == 2
    for span, want, marker in zip(obj["spans"], expected.spans, ("[MASK:4]", "[MASK]")):
        assert set(span) == {"start", "length", "fill", "bytes", "logprob", "candidates"}
        assert span["start"] == DOC.index(marker)  # character offset of the marker in the input
        assert span["length"] == len(span["bytes"]) == len(want.data)
        assert bytes(span["bytes"]) == want.data
        assert span["fill"] == want.data.decode("utf-8", "replace")
        assert span["logprob"] == pytest.approx(want.logprob, abs=1e-5)
        assert span["logprob"] == pytest.approx(sum(want.byte_logprobs), abs=1e-4)
        candidates = span["candidates"]
        assert len(candidates) == 3
        assert candidates[0]["bytes"] == span["bytes"] and candidates[0]["logprob"] == span["logprob"]
        assert [c["logprob"] for c in candidates] == sorted((c["logprob"] for c in candidates), reverse=True)
        assert all(len(c["bytes"]) == span["length"] and c["fill"] == bytes(c["bytes"]).decode("utf-8", "replace")
                   for c in candidates)
    assert span["length"] >= 1 and DOC[span["start"] - 1] == " "  # [MASK] took the space before it


def test_json_without_top_k_has_no_candidates_and_explain_adds_alternatives(tiny_checkpoint, filler):
    plain = json.loads(invoke(tiny_checkpoint, "--json", DOC).stdout)
    assert all("candidates" not in s and "alternatives" not in s for s in plain["spans"])
    result = invoke(tiny_checkpoint, "--json", "--explain", DOC)
    assert result.exit_code == 0, result.stderr
    spans = json.loads(result.stdout)["spans"]
    for span, want in zip(spans, filler.fill(DOC).spans):
        assert len(span["alternatives"]) == span["length"]
        for chosen, alternatives, logprob in zip(span["bytes"], span["alternatives"], want.byte_logprobs):
            assert len(alternatives) == 5
            assert alternatives[0]["byte"] == chosen
            assert alternatives[0]["logprob"] == pytest.approx(logprob, abs=1e-5)
            assert [a["logprob"] for a in alternatives] == sorted((a["logprob"] for a in alternatives), reverse=True)


def test_piped_tables_are_not_mixed_into_the_document(tiny_checkpoint, filler):
    result = invoke(tiny_checkpoint, "-k", "3", "--explain", DOC)
    assert result.exit_code == 0
    # -k 3 widens the search to 3 hypotheses, so compare with the same search (README)
    assert result.stdout_bytes == filler.fill(DOC, top_k=3).data + b"\n"
    assert "--json" in result.stderr  # says where the tables went


# -- long documents -------------------------------------------------------------------------


def long_text(n: int, seed: int = 0) -> str:
    """n characters of words; never starts or ends with a space (no marker next to it takes one)."""
    import random

    rng = random.Random(seed)
    words = "the of and model byte text window latent query a to in is".split()
    out, size = [], 0
    while size < n:
        out.append(rng.choice(words))
        size += len(out[-1]) + 1
    return " ".join(out)[: n - 1] + "."


def test_20kb_document_masks_at_start_middle_and_end(tiny_checkpoint, filler):
    body = long_text(20_000)
    doc = "[MASK:4]" + body[:10_000] + "x[MASK:3]y" + body[10_000:] + "[MASK:5]"
    result = invoke(tiny_checkpoint, stdin=doc.encode())
    assert result.exit_code == 0, result.stderr
    spans = json.loads(invoke(tiny_checkpoint, "--json", stdin=doc.encode()).stdout)["spans"]
    assert [s["length"] for s in spans] == [4, 3, 5]
    assert result.stdout_bytes == rebuild(doc, [bytes(s["bytes"]) for s in spans])
    assert result.stdout_bytes[4:-5] == (body[:10_000] + "x").encode() + bytes(spans[1]["bytes"]) + ("y" + body[10_000:]).encode()
    assert result.stdout_bytes == filler.fill(doc).data


def test_a_span_is_filled_from_the_window_around_it(tiny_checkpoint, filler):
    """Cutting the document down to the window a span is filled from changes nothing."""
    body = long_text(20_000, seed=1)
    tail = "end here."
    doc = "[MASK:4]" + body + "[MASK:5]" + tail
    whole = filler.fill(doc).spans
    # the first span's window is the document's first WINDOW bytes, the last span's its last WINDOW bytes
    head = invoke(tiny_checkpoint, "--json", "[MASK:4]" + body[: WINDOW - 4])
    end = invoke(tiny_checkpoint, "--json", body[-(WINDOW - 5 - len(tail)) :] + "[MASK:5]" + tail)
    assert bytes(json.loads(head.stdout)["spans"][0]["bytes"]) == whole[0].data
    assert bytes(json.loads(end.stdout)["spans"][0]["bytes"]) == whole[1].data


def test_a_document_that_fits_is_the_reference_input(tiny_checkpoint, tiny_reference):
    """A document of exactly one window is one model input, `[CLS] bytes [SEP]`: its fills
    are the reference implementation's argmax, wherever the spans are."""
    doc = "[MASK:3]" + long_text(WINDOW - 3 - 2, seed=2) + "[MASK:2]"
    assert len(masks.parse(doc).pieces[1]) + 5 == WINDOW
    result = invoke(tiny_checkpoint, "--json", doc)
    spans = json.loads(result.stdout)["spans"]
    template = masks.parse(doc)
    ids = [4] + [3] * 3 + [b + 6 for b in template.pieces[1]] + [3] * 2 + [5]
    with torch.no_grad():
        logits = tiny_reference(inputs=torch.tensor([ids])).logits[0]
    expected = bytes(logits[[1, 2, 3, len(ids) - 3, len(ids) - 2], 6:].argmax(-1).tolist())
    assert bytes(spans[0]["bytes"] + spans[1]["bytes"]) == expected


def test_one_megabyte_document_with_one_marker(tiny_checkpoint):
    head, tail = (long_text(500_000, seed=s).encode() for s in (3, 4))
    result = invoke(tiny_checkpoint, stdin=head + b"|[MASK:5]|" + tail + b"\n")
    assert result.exit_code == 0, result.stderr
    out = result.stdout_bytes
    assert len(out) == len(head) + 7 + len(tail) + 1
    assert out.startswith(head + b"|") and out.endswith(b"|" + tail + b"\n")


# -- bytes that are not text ------------------------------------------------------------------


def assert_filled_around(out: bytes, before: bytes, n: int, after: bytes) -> None:
    """`out` is `before`, then n filled bytes, then `after`, byte for byte."""
    assert out.startswith(before) and out.endswith(after) and len(out) == len(before) + n + len(after)


def test_invalid_utf8_on_stdin_comes_back_unchanged(tiny_checkpoint):
    data = b"caf\xe9 au lait [MASK:3] \xff\xfe\x80 fin\n"
    result = invoke(tiny_checkpoint, stdin=data)
    assert result.exit_code == 0, result.stderr
    assert_filled_around(result.stdout_bytes, b"caf\xe9 au lait", 3, b" \xff\xfe\x80 fin\n")
    obj = json.loads(invoke(tiny_checkpoint, "--json", stdin=data).stdout)
    assert obj["text"].startswith("caf\ufffd au lait") and obj["text"].endswith(" \ufffd\ufffd\ufffd fin\n")
    assert obj["spans"][0]["start"] == 13  # characters of the input, one per undecodable byte


def test_nul_bytes_are_filled_around_like_any_byte(tiny_checkpoint):
    data = b"nul\x00here [MASK:2] and\x00there\n"
    result = invoke(tiny_checkpoint, stdin=data)
    assert result.exit_code == 0, result.stderr
    assert_filled_around(result.stdout_bytes, b"nul\x00here", 2, b" and\x00there\n")


# -- bad input and failures: exit codes and one-line errors --------------------------------------

BAD = [
    # (id, arguments after -m, stdin, exit code, part of the message)
    ("no-marker", ["just some text"], None, 2, "no [MASK] marker"),
    ("no-marker-stdin", [], b"line one\nline two\n", 2, "no [MASK] marker"),
    ("mask-0", ["a [MASK:0] b"], None, 2, "masks no bytes"),
    ("mask-x", ["a [MASK:x] b"], None, 2, "N must be a whole number"),
    ("unterminated", ["a [MASK:3"], None, 2, "unterminated mask marker"),
    ("too-long", [f"a [MASK:{WINDOW + 1}]"], None, 2, f"longer than the model's {WINDOW}-byte window"),
    ("thousands-of-digits", [f"a [MASK:{'9' * 5000}] b"], None, 2, "asks for a 5000-digit number of bytes"),
    ("server-not-a-url", ["--server", "http://[::1", "a [MASK:2]"], None, 2, "--server 'http://[::1' is not a URL"),
    ("empty-argument", [""], None, 2, "empty input"),
    ("empty-stdin", [], b"", 2, "empty input"),
    ("empty-dash", ["-"], b"", 2, "empty input"),
    ("top-k-0", ["--top-k", "0", "a [MASK]"], None, 2, "--top-k must be between 1 and 256 (got 0)"),
    ("max-span-0", ["--max-span", "0", "a [MASK]"], None, 2, "--max-span must be at least 1 (got 0)"),
    ("max-span-too-long", ["--max-span", "999", "a [MASK]"], None, 2, "max-span must be between 1 and"),
    ("batch-size-0", ["--batch-size", "0", "a [MASK]"], None, 2, "--batch-size must be between 1 and 256 (got 0)"),
    ("unknown-device", ["--device", "tpu", "a [MASK]"], None, 2, "--device must be one of auto, cpu, cuda, cuda:N, mps (got 'tpu')"),
    ("unknown-strategy", ["--strategy", "guess", "a [MASK]"], None, 2, "--strategy must be one of iterative, beam, oneshot (got 'guess')"),
    ("unknown-quantization", ["--quantize", "int4", "a [MASK]"], None, 2, "--quantize must be one of none, int8 (got 'int4')"),
    ("threads-0", ["--threads", "0", "a [MASK]"], None, 2, "--threads must be between 1 and"),
    ("threads-too-many", ["--threads", "20000", "a [MASK]"], None, 2, "the CPUs this process may use (got 20000)"),
    ("unknown-dtype", ["--dtype", "double", "a [MASK]"], None, 2, "--dtype must be one of auto, float32, bfloat16, float16 (got 'double')"),
    ("int8-in-half-precision", ["--quantize", "int8", "--dtype", "fp16", "a [MASK]"], None, 2, "leave dtype at auto or float32"),
    ("missing-batch-file", ["--batch", "/nonexistent/lines.txt"], None, 2, "cannot read /nonexistent/lines.txt"),
    ("batch-directory", ["--batch", "/"], None, 2, "cannot read /: Is a directory"),
    ("text-and-batch", ["--batch", "-", "a [MASK]"], None, 2, "either TEXT or --batch"),
    ("output-without-batch", ["-o", "out.txt", "a [MASK]"], None, 2, "--batch FILE only"),
    ("resume-without-output", ["--batch", "-", "--resume"], b"a [MASK]\n", 2, "--resume needs -o"),
    # usage errors found by the option parser, one line as well (with where to look)
    ("unknown-option", ["--bogus", "a [MASK]"], None, 2, "No such option: --bogus (see 'perceiver fill --help')"),
    ("misspelt-option", ["--bach", "f"], None, 2, "Possible options: --batch"),
    ("not-a-number", ["--top-k", "abc", "a [MASK]"], None, 2, "Invalid value for '--top-k'"),
    ("extra-argument", ["a [MASK]", "b"], None, 2, "unexpected extra argument"),
    ("missing-option-value", ["a [MASK]", "--device"], None, 2, "'--device' requires an argument"),
]


@pytest.mark.parametrize("args, stdin, code, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_exit_code_and_one_line_error(tiny_checkpoint, args, stdin, code, fragment):
    result = invoke(tiny_checkpoint, *args, stdin=stdin)
    assert result.exit_code == code, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert_one_error_line(result, fragment)


def test_unknown_command_is_one_line_and_no_arguments_is_the_help():
    result = CliRunner().invoke(app, ["nosuch"], prog_name="perceiver")
    assert result.exit_code == 2
    assert_one_error_line(result, "No such command 'nosuch'. (see 'perceiver --help')")
    result = CliRunner().invoke(app, [], prog_name="perceiver")
    assert result.exit_code == 2 and "Usage: perceiver" in result.stdout + result.stderr
    assert "fill" in result.stdout + result.stderr and "error:" not in result.stderr


def test_loading_leaves_the_garbage_collector_on_with_the_model_frozen(tiny_checkpoint, tmp_path):
    gc.unfreeze()
    try:
        filler = cli._load_filler(LoadOptions(str(tiny_checkpoint), device="cpu"))
        assert gc.isenabled() and gc.get_freeze_count() > 0  # off while loading only
        assert filler.fill("Hello [MASK:4] world.").spans[0].length == 4
        gc.unfreeze()
        with pytest.raises(Exception, match="does not exist"):  # a failed load turns it back on too
            cli._load_filler(LoadOptions(str(tmp_path / "missing"), device="cpu"))
        assert gc.isenabled()
    finally:
        gc.unfreeze()


@pytest.mark.parametrize("strategy", ["oneshot", "iterative", "beam"])
def test_top_k_of_the_whole_byte_alphabet_lists_every_candidate_once(filler, strategy):
    candidates = [c.data for c in filler.fill("a [MASK:1] b", strategy=strategy, top_k=256).spans[0].candidates]
    assert len(candidates) == len(set(candidates)) == 256  # a one-byte span has 256 fills


def test_top_k_above_the_cap_is_refused_before_any_work():
    result = CliRunner().invoke(app, ["fill", "-k", "100000", "a [MASK]"], prog_name="perceiver")
    assert result.exit_code == 2
    assert_one_error_line(result, "--top-k must be between 1 and 256 (got 100000)")


def test_empty_model_name_is_bad_input():
    result = CliRunner().invoke(app, ["fill", "-m", "", "a [MASK]"], prog_name="perceiver")
    assert result.exit_code == 2
    assert_one_error_line(result, "--model is empty")


@pytest.mark.parametrize("dtype, tolerance", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_logits_are_close_to_float32(tiny_checkpoint, dtype, tolerance):
    from perceiver_cli.checkpoint import load_model
    from perceiver_cli.filler import DTYPES

    ids = torch.tensor([[1, 72, 101, 3, 3, 111, 33, 2, 0, 0]])
    with torch.inference_mode():
        exact = load_model(tiny_checkpoint)(ids, ids != 0)
        half = load_model(tiny_checkpoint, dtype=DTYPES[dtype])(ids, ids != 0)
    assert half.dtype == DTYPES[dtype]
    assert (half.float() - exact).abs().max() <= tolerance * exact.abs().max()
    result = invoke(tiny_checkpoint, "--dtype", dtype, "--json", "Hello [MASK:4] world.")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["spans"][0]["length"] == 4


def test_float16_overflow_is_one_error_line_naming_float32(tmp_path):
    from safetensors.torch import load_file, save_file

    from .conftest import make_reference

    make_reference(tmp_path, **TINY)
    weights = load_file(tmp_path / "model.safetensors")
    weights["perceiver.input_preprocessor.embeddings.weight"] *= 1e6  # beyond float16's 65504
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    result = invoke(tmp_path, "--dtype", "float16", "a [MASK:2] b")
    assert result.exit_code == 1 and result.stdout == ""
    assert_one_error_line(result, "float16 overflowed on this input")
    assert "--dtype float32" in result.stderr
    assert invoke(tmp_path, "a [MASK:2] b").exit_code == 0  # float32 copes


def test_int8_fills_are_close_to_float32_fills_and_not_the_same_pass(tiny_checkpoint, filler):
    """--quantize int8 (any case, as --device) with --threads: the same fills as float32 here,
    log-probabilities close but not equal (the int8 products really ran)."""
    result = invoke(tiny_checkpoint, "--quantize", "INT8", "--threads", "1", "--json", "--strategy", "oneshot", DOC)
    assert result.exit_code == 0, result.stderr
    spans = json.loads(result.stdout)["spans"]
    fp32 = filler.fill(DOC, strategy="oneshot").spans
    assert [bytes(s["bytes"]) for s in spans] == [s.data for s in fp32]
    differences = [abs(s["logprob"] - f.logprob) for s, f in zip(spans, fp32)]
    assert all(d < 0.1 for d in differences) and any(d > 1e-4 for d in differences), differences


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_bad_input(tiny_checkpoint):
    result = invoke(tiny_checkpoint, "--device", "cuda", "a [MASK:2]")
    assert result.exit_code == 2
    assert_one_error_line(result, "device 'cuda' is not available")


def test_missing_model_is_a_runtime_failure_with_a_traceback_only_in_debug_mode(tmp_path):
    missing = tmp_path / "no-such-model"
    result = invoke(missing, "a [MASK:2]")
    assert result.exit_code == 1
    assert_one_error_line(result, str(missing))
    debug = invoke(missing, "a [MASK:2]", env={"PERCEIVER_DEBUG": "1"})
    assert debug.exit_code == 1
    assert debug.exception is not None and str(missing) in str(debug.exception)  # raised, not one line


def test_a_model_directory_that_is_not_a_checkpoint_fails_with_exit_1(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = invoke(tmp_path, "a [MASK:2]")
    assert result.exit_code == 1
    assert_one_error_line(result, str(tmp_path))


# -- terminal rendering ---------------------------------------------------------------------------


def terminal(**kw) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    options = dict(file=buf, force_terminal=True, color_system="truecolor", width=120)
    options.update(kw)
    return Console(**options), buf


def test_terminal_document_highlights_fills_by_confidence(filler):
    result = filler.fill("Hello [MASK:4] world, [bold]not markup[/bold] [MASK:2].")
    console, buf = terminal()
    render.document(result, console)
    out = buf.getvalue()
    assert "\x1b[" in out and "[bold]not markup[/bold]" in out  # coloured; the user's brackets stay literal
    plain, _ = terminal(color_system=None, force_terminal=False)
    render.document(result, plain)
    assert plain.file.getvalue() == result.data.decode("utf-8", "replace") + "\n"
    colours = {render.confidence_colour(p) for p in (0.95, 0.6, 0.3, 0.01)}
    assert len(colours) == 4  # four distinct confidence bands


def test_terminal_fill_shows_control_bytes_as_pictures(filler):
    from perceiver_cli.results import FillResult, SpanResult

    span = SpanResult(start=2, length=3, data=b"\x1b\x00\xe2", logprob=-3.0, byte_logprobs=[-0.01, -1.0, -2.0],
                      alternatives=[[(27, -0.01)], [(0, -1.0)], [(226, -2.0)]])
    result = FillResult(b"a \x1b\x00\xe2 b", [span], (b"a ", b" b"))
    console, buf = terminal(color_system=None)
    render.document(result, console)
    out = buf.getvalue()
    assert "\u241b\u2400\ufffd" in out and "\x1b\x00" not in out.replace("\x1b[", "")


def test_legend_candidates_and_explain_tables(filler):
    result = filler.fill("Hello [MASK:4] world [MASK:3].", top_k=3)
    console, buf = terminal()
    render.legend(console)
    render.candidates(result, console, 3)
    render.explain(result, console)
    text = buf.getvalue()
    assert "fill confidence" in text and ">=90%" in text and "<20%" in text
    for span in result.spans:
        for c in span.candidates:
            assert render.show_fill(c.fill) in text
            assert render.percent(2.718281828 ** c.logprob) in text
        for alternatives in span.alternatives:
            assert render.show_byte(alternatives[1][0]) in text  # a runner-up byte of each position
    no_colour, buf2 = terminal(no_color=True)
    render.legend(no_colour)
    render.document(result, no_colour)
    out = buf2.getvalue()
    assert "fill confidence" not in out  # no colours, so nothing to explain
    assert "\x1b[1;4m" in out and not colour_codes(out)  # fills still bold+underlined, never coloured


def colour_codes(out: str | bytes) -> list[str]:
    """The SGR parameters in `out` that set a colour (30-38, 40-48, 90-97, 100-107)."""
    import re

    text = out.decode("utf-8", "replace") if isinstance(out, bytes) else out
    codes = [c for params in re.findall(r"\x1b\[([0-9;]*)m", text) for c in params.split(";") if c]
    return [c for c in codes if c.isdigit() and (30 <= int(c) <= 48 or 90 <= int(c) <= 107)]


def test_percent_and_byte_display():
    assert render.percent(0.4123) == "41.2%" and render.percent(3.1e-7) == "<0.1%"
    assert [render.show_byte(b) for b in (97, 32, 10, 0xE2)] == ["'a'", "' '", r"'\n'", r"\xe2"]
    assert render.utf8_chars("é€".encode() + b"\xff") == [("é", 0, 2), ("€", 2, 5), ("\ufffd", 5, 6)]


# -- real processes ---------------------------------------------------------------------------------






@pytest.fixture(scope="module")
def processes(tiny_checkpoint, tmp_path_factory):
    """Run the subprocess scenarios side by side; {name: (returncode, stdout, stderr)}."""
    tmp = tmp_path_factory.mktemp("processes")
    env = process_env(tmp)
    cmd = perceiver("fill", "-m", str(tiny_checkpoint))
    big = tmp / "big.txt"
    big.write_text(long_text(1_000_000, seed=4) + " [MASK:4].\n")
    quoted = " ".join(f"'{c}'" for c in cmd)
    started: dict[str, tuple] = {}

    def start(name, args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env, shell=False, **kw):
        p = subprocess.Popen(args, stdin=stdin, stdout=stdout, stderr=subprocess.PIPE, env=env, shell=shell, **kw)
        started[name] = (p, kw)
        return p

    document = tmp / "multiline.txt"
    document.write_bytes(MULTILINE.encode())
    start("pipe", f"cat '{document}' | {quoted}", shell=True, executable="/bin/bash")  # stdin is a pipe
    start("head", f"{quoted} < '{big}' | head -c1", shell=True, executable="/bin/bash")
    # the reader is gone long before the filler writes: the write meets a closed pipe
    start("closed", f"{quoted} < '{big}' | true; exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash")
    start("help-closed", f"{quoted} --help | true; exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash")
    start("bad", [*cmd, "no marker here"])
    start("help", [sys.executable, "-c", (
        "import sys\nfrom typer.testing import CliRunner\nfrom perceiver_cli.cli import app\n"
        "r = CliRunner().invoke(app, ['fill', '--help'])\n"
        "print(r.exit_code, 'torch' in sys.modules)\nprint(r.stdout)"
    )])
    # torch is loaded before these end, so main() leaves with os._exit: what a normal exit
    # does that matters must still happen (atexit handlers, flushed output, the exit code)
    marker = tmp / "atexit-ran"
    start("fast-exit", [sys.executable, "-c", (
        "import atexit, sys\nfrom pathlib import Path\nmarker = Path(sys.argv[1])\n"
        "atexit.register(lambda: marker.write_text(str('torch' in sys.modules)))\n"
        "sys.argv = ['perceiver', *sys.argv[2:]]\nfrom perceiver_cli.cli import main\nmain()"
    ), str(marker), *cmd[3:], "Hello [MASK:4] world."])
    start("late-error", [*cmd, "--max-span", "100000", "Hello [MASK] world."])  # found after loading
    ttys = {}
    for name, extra in (("tty", {}), ("tty-no-color", {"NO_COLOR": "1"})):
        master, slave = pty.openpty()
        start(name, [*cmd, "Hello [MASK:4] world."], stdout=slave, env=process_env(tmp, COLUMNS="100", **extra))
        os.close(slave)
        ttys[name] = master
    master, slave = pty.openpty()  # nothing given and stdin a terminal: the usage, no waiting
    start("usage", cmd, stdin=slave)
    os.close(slave)
    ttys["usage"] = master

    results = {}
    tty_output = {name: read_pty(fd) for name, fd in ttys.items()}
    for name, (p, _) in started.items():
        out, err = p.communicate(timeout=120)
        results[name] = (p.returncode, tty_output.get(name, out), err)
    for fd in ttys.values():
        os.close(fd)
    results["atexit"] = marker.read_text() if marker.exists() else None
    return results


def test_process_pipe_gives_the_plain_document(processes, filler):
    code, out, err = processes["pipe"]
    assert code == 0 and err == b""
    assert out == filler.fill(MULTILINE).data
    assert ANSI not in out


def test_process_closed_pipe_ends_quietly(processes):
    code, out, err = processes["head"]
    assert code == 0 and len(out) == 1 and err == b""  # `| head -c1`: one byte, nothing on stderr
    code, _, err = processes["closed"]
    assert err == b"" and code == 141  # like a process ended by SIGPIPE, without a word
    code, _, err = processes["help-closed"]
    assert err == b"" and code == 141  # the help too


def test_process_bad_input_exit_code(processes):
    code, out, err = processes["bad"]
    assert code == 2 and out == b""
    assert err.decode().splitlines() == ["error: no [MASK] marker in the text: put [MASK] or [MASK:N] where bytes are missing"]


def test_process_exit_after_torch_runs_atexit_handlers_and_keeps_output_and_code(processes, filler):
    code, out, err = processes["fast-exit"]
    assert code == 0 and err == b"", err
    assert out == filler.fill("Hello [MASK:4] world.").data + b"\n"
    assert processes["atexit"] == "True"  # the handler ran, in a process that had loaded torch
    code, out, err = processes["late-error"]
    assert code == 2 and out == b""
    assert err.decode().splitlines() == ["error: --max-span must be between 1 and 62 bytes, this model's window (got 100000)"]


def test_help_shows_examples_without_importing_torch(processes):
    code, out, err = processes["help"]
    first, _, rest = out.decode().partition("\n")
    assert code == 0 and first == "0 False", err
    assert "Examples" in rest and "perceiver fill --batch sentences.txt --json" in rest


def test_process_terminal_gets_colour_and_no_color_is_honoured(processes, filler):
    fill = filler.fill("Hello [MASK:4] world.")
    code, out, err = processes["tty"]
    assert code == 0, err
    assert colour_codes(out) and b"fill confidence" in out  # coloured fills, and a legend
    assert out.startswith(b"Hello\x1b[1;4;")  # the fill right after the text, bold, underlined, coloured
    code, out, err = processes["tty-no-color"]
    assert code == 0, err
    assert not colour_codes(out) and b"fill confidence" not in out
    assert b"\x1b[1;4m" in out  # the fill still stands out: bold and underlined
    shown = fill.data.decode("utf-8", "replace")
    assert out.startswith(b"Hello\x1b[1;4m") and out.replace(b"\r\n", b"\n").endswith((shown[-len(" world."):] + "\n").encode())


def test_process_without_input_on_a_terminal_shows_usage(processes):
    code, out, err = processes["usage"]
    assert code == 2
    assert b"Usage: " in err and b"error: no text" in err and b"Traceback" not in err


def test_process_ctrl_c_exits_130_without_a_traceback(tiny_checkpoint, tmp_path):
    """SIGINT while the command waits for stdin (the pipe stays open, nothing comes)."""
    p = subprocess.Popen(perceiver("fill", "-m", str(tiny_checkpoint)),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=process_env(tmp_path),
                         preexec_fn=ctrl_c_reaches_it)
    try:
        assert wait_until_blocked(p.pid), "the command never waited for input"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 130
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err




def test_a_malformed_hf_endpoint_is_bad_input_naming_the_variable(tmp_path):
    result = CliRunner().invoke(app, ["fill", "-m", "org/model", "a [MASK:2]"], prog_name="perceiver",
                                env={"HF_ENDPOINT": "http://[::1", "HF_HOME": str(tmp_path)})
    assert result.exit_code == 2
    assert_one_error_line(result, "HF_ENDPOINT 'http://[::1' is not an http:// or https:// URL")


def test_columns_0_still_shows_errors_and_results(tiny_checkpoint, tmp_path):
    """rich takes COLUMNS as the width, and at 0 it printed nothing: no error line, and
    on a terminal (FORCE_COLOR) no result either."""
    bad = run_process(perceiver("fill", "-m", str(tiny_checkpoint), "no marker"), tmp_path, COLUMNS="0")
    assert bad.returncode == 2 and bad.stderr.decode().startswith("error: no [MASK] marker")
    good = run_process(perceiver("fill", "-m", str(tiny_checkpoint), "Hello [MASK:4] world."), tmp_path,
                       COLUMNS="0", FORCE_COLOR="1")
    assert good.returncode == 0, good.stderr
    shown = re.sub(rb"\x1b\[[0-9;]*m", b"", good.stdout)
    assert shown.startswith(b"Hello") and b" world." in shown  # the document, its fill shown in place


def test_an_unwritable_stderr_keeps_the_exit_code(tiny_checkpoint, tmp_path):
    with open("/dev/full", "w") as full:
        p = subprocess.run(perceiver("fill", "-m", str(tiny_checkpoint), "no marker"), stdout=subprocess.PIPE,
                           stderr=full, env=process_env(tmp_path), timeout=120)
    assert p.returncode == 2 and p.stdout == b""


def test_bidirectional_controls_in_a_fill_are_escaped_on_a_terminal():
    assert render.show_fill("a\u202eb") == '"a\\u202eb"'  # a right-to-left override would reorder the line
    assert render.show_fill("é\n") == '"é\\n"'


def test_download_of_a_local_directory_checks_it_as_info_does(tiny_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short
    result = CliRunner().invoke(app, ["download", "-m", str(broken)], prog_name="perceiver")
    assert result.exit_code == 1 and result.stdout == ""
    assert_one_error_line(result, "cannot read weights file")
    whole = CliRunner().invoke(app, ["download", "-m", str(tiny_checkpoint)], prog_name="perceiver")
    assert whole.exit_code == 0 and "(local directory)" in whole.stdout


# -- help, options and what a newcomer meets ----------------------------------------------------


def help_entries(command: str) -> dict[str, str]:
    """`perceiver COMMAND --help`'s options: {flag: its help, on one line}."""
    result = CliRunner().invoke(app, [command, "--help"], prog_name="perceiver", terminal_width=300,
                                max_content_width=300)  # one line each
    assert result.exit_code == 0, result.stderr
    entries: dict[str, str] = {}
    for line in result.stdout.split("Options:", 1)[1].splitlines():
        found = re.match(r"\s+(?:-\w, )?(--[\w-]+)(?: \S+)?\s{2,}(.*)", line)
        if found:
            entries[found.group(1)] = found.group(2)
        elif line.strip() and entries:
            entries[list(entries)[-1]] += " " + line.strip()
    return entries


def test_help_shows_the_defaults_of_the_options_dataclasses():
    from dataclasses import fields

    from perceiver_cli.options import FillOptions, RayOptions, ServeOptions

    commands = {"fill": (LoadOptions, FillOptions), "ray-fill": (LoadOptions, FillOptions, RayOptions),
                "serve": (LoadOptions, ServeOptions), "info": (LoadOptions,), "download": (LoadOptions,)}
    shown = 0
    for command, classes in commands.items():
        entries = help_entries(command)
        assert all(entry.count("default:") <= 1 for entry in entries.values()), entries  # none typed by hand
        for cls in classes:
            for f in fields(cls):
                flag = "--" + f.name.replace("_", "-")
                if flag in entries and f.default not in (None, False):
                    assert f"default: {f.default}]" in entries[flag], (command, flag, entries[flag])
                    shown += 1
    assert shown >= 30


def test_fill_and_ray_fill_share_one_declaration_of_the_fill_and_load_options():
    fill, ray = help_entries("fill"), help_entries("ray-fill")
    shared = ["--strategy", "--top-k", "--max-span", "--mask-token", "--explain", "--choice", "--choice-score",
              "--batch-size", "--model", "--revision", "--device", "--dtype", "--quantize", "--offline"]
    assert [fill[flag] for flag in shared] == [ray[flag] for flag in shared]
    serve = help_entries("serve")
    assert [serve[flag] for flag in shared[7:]] == [fill[flag] for flag in shared[7:]]


@pytest.mark.parametrize("args, message", [
    (["--choice", ""], "--choice must not hold an empty word"),
    (["--choice", "a", "--choice", "a"], "--choice holds 'a' twice"),
    (["--choice", "a", "--choice-score", "max"], "--choice-score must be one of chain, chain-mean, pll"),
])
def test_ray_fill_takes_choices_validated_as_fill_does(tiny_checkpoint, tmp_path, args, message):
    source = tmp_path / "in.txt"
    source.write_text("a [MASK] b\n")
    filled = invoke(tiny_checkpoint, *args, "a [MASK] b")
    ray = CliRunner().invoke(app, ["ray-fill", str(source), "-o", str(tmp_path / "out"), *args], prog_name="perceiver")
    assert filled.exit_code == ray.exit_code == 2
    assert_one_error_line(filled, message)
    assert ray.stderr == filled.stderr and not (tmp_path / "out").exists()  # before Ray starts


def test_int8_on_gpus_is_refused_by_the_one_rule_of_options():
    from perceiver_cli.options import INT8_CPU_ONLY

    result = CliRunner().invoke(app, ["ray-fill", "x.txt", "-o", "out", "--quantize", "int8", "--gpus-per-actor", "1"],
                                prog_name="perceiver")
    assert result.exit_code == 2
    assert_one_error_line(result, INT8_CPU_ONLY)
    assert "CPU only" not in Path(cli.__file__).read_text()  # said once, in options.py


def test_short_version_flag_and_whole_command_descriptions():
    long, short = (CliRunner().invoke(app, [flag], prog_name="perceiver") for flag in ("--version", "-V"))
    assert long.exit_code == short.exit_code == 0 and short.stdout == long.stdout
    assert short.stdout.startswith("perceiver ")
    top = CliRunner().invoke(app, ["--help"], prog_name="perceiver", env={"COLUMNS": "80"})
    commands = top.stdout.split("Commands:", 1)[1]
    assert "..." not in commands and "…" not in commands
    assert [line.split()[0] for line in commands.strip().splitlines()] == ["fill", "serve", "download", "info", "ray-fill"]


def test_help_names_what_a_value_is():
    fill = CliRunner().invoke(app, ["fill", "--help"], prog_name="perceiver", env={"COLUMNS": "100"}).stdout
    assert re.search(r"--batch FILE\s", fill) and re.search(r"--server URL\s", fill)
    assert "<list[str]>" not in fill and fill.startswith("Usage: perceiver fill [OPTIONS] [TEXT]\n")
    ray = CliRunner().invoke(app, ["ray-fill", "--help"], prog_name="perceiver", env={"COLUMNS": "100"}).stdout
    assert ray.startswith("Usage: perceiver ray-fill [OPTIONS] INPUT...\n")
    assert "<list[str]>" not in ray and re.search(r"\n  INPUT\.\.\.\s+Text files", ray)


@pytest.mark.parametrize("text, meant", [("a [mask] b", "[MASK]"), ("a <mask> b", "[MASK]"),
                                         ("a [MASK ] b", "[MASK]"), ("a [Mask:3] b", "[MASK:3]")])
def test_a_marker_that_is_almost_right_gets_a_hint(tiny_checkpoint, text, meant):
    result = invoke(tiny_checkpoint, text)
    assert result.exit_code == 2
    assert_one_error_line(result, f"no [MASK] marker in the text: put [MASK] or [MASK:N] where bytes are missing "
                                  f"(found {text[2:-2]!r} at character 2: did you mean {meant}?)")
    plain = invoke(tiny_checkpoint, "she wore a mask")
    assert plain.stderr.strip().endswith("where bytes are missing")  # a word in prose is no near miss


def test_dash_on_a_terminal_says_how_the_text_ends(tiny_checkpoint, tmp_path):
    master, slave = pty.openpty()
    p = subprocess.Popen(perceiver("fill", "-m", str(tiny_checkpoint), "-"), stdin=slave, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=process_env(tmp_path))
    os.close(slave)
    os.write(master, b"Hello [MASK:4] world.\n\x04")
    out, err = p.communicate(timeout=120)
    os.close(master)
    assert p.returncode == 0, err
    assert err.decode().splitlines() == ["reading the text from the terminal until Ctrl-D (an empty line does not end it)"]
    assert out.startswith(b"Hello") and out.endswith(b" world.\n")


README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_readme_python_example_as_keywords_is_the_same_fill():
    options = re.search(r"\noptions = FillOptions\((.*)\)  #", README).group(1)
    keywords = re.search(r"\nresult = filler\.fill\(\"[^\"]*\", (.*)\)  # the same, as keywords", README).group(1)
    assert eval(f"dict({options})") == eval(f"dict({keywords})")


def test_readme_states_the_small_model_size_as_info_does():
    small = Path(__file__).resolve().parents[1] / "tests" / "assets" / "perceiver-small"
    result = CliRunner().invoke(app, ["info", "-m", str(small), "--device", "cpu"], prog_name="perceiver")
    assert result.exit_code == 0, result.stderr
    size = re.search(r"^size:\s+(\S+ MB)", result.stdout, re.M).group(1)
    assert f"`tests/assets/perceiver-small`, 1.5M parameters, {size}" in README


# -- the work budget (README: Limits) -------------------------------------------------------


def test_a_text_over_the_budget_is_exit_2_naming_the_flag_and_raising_it_fills():
    from .conftest import SMALL

    text = "The capital of France is [MASK]."  # a probe, 2 scored lengths, 2 passes: 5 model inputs
    over = CliRunner().invoke(app, ["fill", "-m", str(SMALL), "--max-inputs", "4", text], prog_name="perceiver")
    assert over.exit_code == 2 and over.stdout == ""
    assert_one_error_line(over, "the fill would take about 5 model inputs, over the budget's 4 (--max-inputs): ask for ")
    assert over.stderr.rstrip().split(": ask for ", 1)[1].count("raise --max-inputs") == 1
    assert "max_inputs" not in over.stderr  # the flags a user can turn, not the library's field names
    raised = CliRunner().invoke(app, ["fill", "-m", str(SMALL), "--max-inputs", "5", text], prog_name="perceiver")
    assert raised.exit_code == 0 and raised.stdout.startswith("The capital of France is")


def test_a_batch_line_over_the_budget_is_its_error_and_the_others_are_filled(tmp_path):
    from .conftest import SMALL

    source = tmp_path / "in.txt"
    source.write_text("Hello [MASK:3] world.\nA [MASK] B [MASK] C [MASK] D.\nx [MASK:1] y\n")  # 2, 9 and 1 inputs
    result = CliRunner().invoke(app, ["fill", "-m", str(SMALL), "--max-inputs", "4", "--batch", str(source), "--json"],
                                prog_name="perceiver")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3] and "text" in records[0] and "text" in records[2]
    error = records[1]["error"]
    assert error.startswith("the fill would take about 9 model inputs, over the budget's 4 (--max-inputs): ")
    assert "a smaller --max-span" in error and "raise --max-inputs" in error
    assert "length_candidates: no command-line flag" in error  # an option the command line does not offer
    assert "2 filled, 1 failed" in result.stderr


def test_help_shows_the_budget_and_its_defaults_on_every_command_that_fills():
    from dataclasses import fields

    from perceiver_cli.options import Budget, ServeOptions

    for command in ("fill", "ray-fill", "serve"):
        entries = help_entries(command)
        for f in fields(Budget):
            flag = "--" + f.name.replace("_", "-")
            default = ServeOptions.max_inputs if command == "serve" and f.name == "max_inputs" else f.default
            assert f"default: {default}]" in entries[flag], (command, flag, entries[flag])
    fill, ray, serve = help_entries("fill"), help_entries("ray-fill"), help_entries("serve")
    budget = ["--max-inputs", "--max-search", "--max-memory-mb", "--max-answer-mb"]
    assert [fill[flag] for flag in budget] == [ray[flag] for flag in budget]  # one declaration
    assert [fill[flag] for flag in budget[1:]] == [serve[flag] for flag in budget[1:]]
    assert "each of its texts" in serve["--max-inputs"]  # the server's: per request, and each text held to it


def test_every_fill_option_is_a_flag_or_said_to_have_none():
    from dataclasses import fields

    from perceiver_cli.options import NO_FLAG, FillOptions, flag_of

    entries = help_entries("fill")
    for f in fields(FillOptions):
        assert (flag_of(f.name) in entries) == (f.name not in NO_FLAG), f.name


def test_readme_limits_and_security_list_every_budget_its_default_and_flag():
    from dataclasses import fields

    from perceiver_cli.options import Budget, ServeOptions

    limits = README.split("### Limits", 1)[1].split("\n## ", 1)[0]
    security = README.split("**Security.**", 1)[1].split("\n\n", 1)[0]
    for f in fields(Budget):
        flag = "--" + f.name.replace("_", "-")
        row = next(line for line in limits.splitlines() if line.startswith(f"| `{flag}` (`{f.name}`) |"))
        assert f"| {f.default:,}" in row, row
        assert f"`{flag}`" in security, flag
    assert f"{ServeOptions.max_inputs:,}" in security and "over the budget's 4 (--max-inputs)" in limits
