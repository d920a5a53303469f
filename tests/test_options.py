"""Every door's options (options.py): each rule's one message, the normal forms values take,
`replace` / `from_dict` / `to_dict`, the flag a message shows on the command line, and the
API key's rules and where it is read from."""

from __future__ import annotations

import dataclasses

import pytest

from perceiver_cli.errors import InputError
from perceiver_cli.options import (
    API_KEY_ENV,
    INT8_CPU_ONLY,
    MAX_CHOICES,
    FillOptions,
    LoadOptions,
    OptionError,
    RayOptions,
    ServeOptions,
    check_api_key,
    client_api_key,
    read_api_key,
)
from perceiver_cli.runtime import available_cpus


def refused(cls, **values) -> OptionError:
    """The OptionError that building `cls(**values)` raises."""
    with pytest.raises(OptionError) as caught:
        cls(**values)
    return caught.value


def check_messages(cls, cases):
    for values, message in cases:
        assert str(refused(cls, **values)) == message, values


# -- OptionError, replace, from_dict -------------------------------------------------------------


def test_an_option_error_is_bad_input_that_names_its_field_or_its_flag():
    error = refused(FillOptions, top_k=0)
    assert isinstance(error, InputError) and error.exit_code == 2
    assert (error.name, error.rule) == ("top_k", "must be between 1 and 256 (got 0)")
    assert str(error) == "top_k must be between 1 and 256 (got 0)"  # what a Python caller sees
    assert error.flag() == "--top-k must be between 1 and 256 (got 0)"  # what the command line shows
    assert refused(LoadOptions, batch_size=0).flag() == "--batch-size must be between 1 and 256 (got 0)"
    assert refused(FillOptions, choices=("",)).flag() == "--choice must not hold an empty word"  # given as --choice
    for bad in (("a", "a"), (1,), tuple(f"w{i}" for i in range(MAX_CHOICES + 1))):
        assert refused(FillOptions, choices=bad).flag().startswith("--choice "), bad


def test_replace_validates_and_leaves_the_original_as_it_was():
    options = FillOptions(top_k=2)
    changed = options.replace(top_k=5, strategy=" Beam ")
    assert (changed.top_k, changed.strategy) == (5, "beam") and options.top_k == 2
    with pytest.raises(OptionError, match=r"^top_k must be between 1 and 256 \(got 300\)$"):
        options.replace(top_k=300)
    with pytest.raises(OptionError) as caught:
        options.replace(topk=3)
    assert caught.value.name == "topk"
    assert str(caught.value).startswith("topk is not an option of FillOptions (options: beam_width, choice_score, ")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("options", [
    LoadOptions(model="org/x", revision="v1", device="cpu", dtype="fp32", threads=1, offline=True, batch_size=3),
    FillOptions(strategy="beam", top_k=3, explain=True, iterative_passes=None, length_alpha=1, mask_token="<m>"),
    FillOptions(choices=("a", "b"), choice_score="pll", single_line=True),
    ServeOptions(host="0.0.0.0", port=0, max_body_mb=0.5, batch_wait_ms=0, api_key="k"),
    RayOptions(address="auto", actors=2, gpus_per_actor=0.5, cpus_per_actor=2),
])
def test_from_dict_of_to_dict_gives_the_same_options(options):
    assert type(options).from_dict(options.to_dict()) == options


def test_from_dict_takes_a_json_object_and_refuses_what_is_not_an_option():
    assert FillOptions.from_dict({"choices": ["a", "bb"]}) == FillOptions(choices=("a", "bb"))
    assert FillOptions.from_dict({"top_k": 3, "explain": True}) == FillOptions(top_k=3, explain=True)
    assert FillOptions.from_dict({}) == FillOptions()
    for bad in ([], "top_k=3", None):
        with pytest.raises(InputError, match="^FillOptions must be given as an object of option names and values$"):
            FillOptions.from_dict(bad)
    with pytest.raises(OptionError, match="^beams is not an option of FillOptions"):
        FillOptions.from_dict({"beams": 2})
    with pytest.raises(OptionError, match="^port must be between 0 and 65535"):
        ServeOptions.from_dict({"port": -1})


# -- LoadOptions ---------------------------------------------------------------------------------


def test_load_options_defaults_and_normal_forms():
    default = LoadOptions()
    assert (default.model, default.revision, default.device, default.dtype, default.quantize) == (
        "deepmind/language-perceiver", None, "auto", "auto", "none")
    assert (default.threads, default.offline, default.batch_size) == (None, False, 8)
    assert LoadOptions(device=" CUDA:1 ").device == "cuda:1"
    assert LoadOptions(device="").device == "auto"
    dtypes = [LoadOptions(dtype=d).dtype for d in ("fp32", "BF16", " fp16", None)]
    assert dtypes == ["float32", "bfloat16", "float16", "auto"]
    assert [LoadOptions(quantize=q).quantize for q in (" INT8", None)] == ["int8", "none"]
    for revision in ("main", "v1.0", "refs/pr/1", "0123456789abcdef0123456789abcdef01234567"):
        assert LoadOptions(revision=revision).revision == revision
    assert LoadOptions(quantize="int8", device="cpu", dtype="float32").quantize == "int8"
    assert LoadOptions(threads=available_cpus(), batch_size=256).threads == available_cpus()


BAD_REVISIONS = ("", "../x", "main/../../x", "/etc", "main/", "a//b", "a\\b", " main", "a\x00b", "a\x7fb", "x\ud800")


def test_load_options_rules_and_their_messages():
    cpus = available_cpus()
    model = "model is empty: give a Hub repo id (like deepmind/language-perceiver) or a checkpoint directory"
    device = "device must be one of auto, cpu, cuda, cuda:N, mps"
    dtype = "dtype must be one of auto, float32, bfloat16, float16"
    check_messages(LoadOptions, [
        ({"model": ""}, model),
        ({"model": " \t"}, model),
        ({"model": None}, model),
        ({"revision": 3}, "revision must be a string (got 3)"),
        *(({"revision": r}, f"revision {r!r} is not a branch, tag or commit name") for r in BAD_REVISIONS),
        ({"device": "tpu"}, f"{device} (got 'tpu')"),
        ({"device": "cuda:x"}, f"{device} (got 'cuda:x')"),
        ({"device": 0}, f"{device} (got 0)"),
        ({"dtype": "float64"}, f"{dtype} (got 'float64')"),
        ({"dtype": 16}, f"{dtype} (got 16)"),
        ({"quantize": "int4"}, "quantize must be one of none, int8 (got 'int4')"),
        ({"threads": 0}, f"threads must be between 1 and {cpus}, the CPUs this process may use (got 0)"),
        ({"threads": cpus + 1},
         f"threads must be between 1 and {cpus}, the CPUs this process may use (got {cpus + 1})"),
        ({"threads": True}, "threads must be a whole number (got True)"),
        ({"threads": 1.0}, "threads must be a whole number (got 1.0)"),
        ({"offline": "yes"}, "offline must be true or false (got 'yes')"),
        ({"batch_size": 0}, "batch_size must be between 1 and 256 (got 0)"),
        ({"batch_size": 257}, "batch_size must be between 1 and 256 (got 257)"),
        ({"quantize": "int8", "device": "cuda"}, f"quantize {INT8_CPU_ONLY}: use device cpu"),
        ({"quantize": "int8", "dtype": "fp16"},
         "quantize int8 keeps the other products in float32: leave dtype at auto or float32"),
    ])


# -- FillOptions ---------------------------------------------------------------------------------


def test_fill_options_normal_forms():
    assert FillOptions(strategy=" Beam ").strategy == "beam"
    assert FillOptions(choices=["a", "b"]).choices == ("a", "b")  # a JSON list becomes a tuple
    assert hash(FillOptions(choices=["a"])) == hash(FillOptions(choices=("a",)))  # the server groups by options
    assert FillOptions(choices="word").choices == ("word",)
    assert FillOptions(choices=("raw \udcff byte",)).choices == ("raw \udcff byte",)  # a byte read with surrogateescape
    assert FillOptions(choices=("two\nlines",)).choices == ("two\nlines",)  # a line break only matters with single_line
    assert FillOptions(choices=("a",), choice_score="PLL-mean").choice_score == "pll-mean"
    bounds = FillOptions(iterative_passes=None, length_candidates=None, length_alpha=0, length_prior=10, top_k=256)
    assert (bounds.iterative_passes, bounds.length_candidates, bounds.top_k) == (None, None, 256)
    assert FillOptions(length_candidates=0).length_candidates == 0  # the probe alone decides


def test_fill_options_rules_and_their_messages():
    scores = "chain, chain-mean, pll, pll-mean, sum, sum-mean"
    check_messages(FillOptions, [
        ({"strategy": "greedy"}, "strategy must be one of iterative, beam, oneshot (got 'greedy')"),
        ({"top_k": 0}, "top_k must be between 1 and 256 (got 0)"),
        ({"top_k": 257}, "top_k must be between 1 and 256 (got 257)"),
        ({"max_span": 0}, "max_span must be at least 1 (got 0)"),
        ({"mask_token": ""}, "mask_token must be a non-empty literal"),
        ({"mask_token": "  "}, "mask_token must be a non-empty literal"),
        ({"mask_token": 5}, "mask_token must be a non-empty literal"),
        ({"mask_token": "[M\nASK]"}, "mask_token must not hold a line break"),
        ({"mask_token": "[MASK]\r"}, "mask_token must not hold a line break"),
        ({"explain": "yes"}, "explain must be true or false (got 'yes')"),
        ({"single_line": 1}, "single_line must be true or false (got 1)"),
        ({"iterative_passes": 0}, "iterative_passes must be at least 1 (got 0)"),
        ({"beam_width": 0}, "beam_width must be between 1 and 256 (got 0)"),
        ({"length_alpha": -0.1}, "length_alpha must be a number between 0 and 10 (got -0.1)"),
        ({"length_alpha": True}, "length_alpha must be a number between 0 and 10 (got True)"),
        ({"length_prior": 10.5}, "length_prior must be a number between 0 and 10 (got 10.5)"),
        ({"length_prior": "1"}, "length_prior must be a number between 0 and 10 (got '1')"),
        ({"length_candidates": -1}, "length_candidates must be at least 0 (got -1)"),
        ({"choices": ("",)}, "choices must not hold an empty word"),
        ({"choices": ("a", "a")}, "choices holds 'a' twice"),
        ({"choices": (1,)}, "choices must be a list of words (got (1,))"),
        ({"choices": {"a"}}, "choices must be a list of words (got {'a'})"),
        ({"choices": tuple(f"w{i}" for i in range(MAX_CHOICES + 1))},
         f"choices may hold at most {MAX_CHOICES} words (got {MAX_CHOICES + 1})"),
        ({"choices": ("a\ud800",)}, "choices 'a\\ud800' holds a lone surrogate: not a character"),
        ({"choices": ("two\nlines",), "single_line": True},
         "choices 'two\\nlines' holds a line break: plain --batch output is one line per input line"
         " (--json may hold one)"),
        ({"choice_score": "max"}, f"choice_score must be one of {scores} (got 'max')"),
    ])


# -- ServeOptions --------------------------------------------------------------------------------


def test_serve_options_defaults_and_what_they_imply():
    default = ServeOptions()
    assert (default.host, default.port, default.max_batch, default.queue_size, default.api_key) == (
        "127.0.0.1", 8000, 16, 64, None)
    assert default.max_body == 4 * 1024 * 1024 and ServeOptions(max_body_mb=0.5).max_body == 512 * 1024
    for host in ("127.0.0.1", "127.1.2.3", "localhost", "::1"):
        assert ServeOptions(host=host).loopback, host
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.org"):
        assert not ServeOptions(host=host).loopback, host
    assert ServeOptions(port=0, batch_wait_ms=0).port == 0  # any free port; no wait for more requests
    assert "s3cret" not in repr(ServeOptions(api_key="s3cret"))  # a key never shows in a log or a traceback


def test_serve_options_rules_and_their_messages():
    host = "host must be an address to listen on, like 127.0.0.1"
    check_messages(ServeOptions, [
        ({"host": ""}, host),
        ({"host": " "}, host),
        ({"host": 5}, host),
        ({"port": -1}, "port must be between 0 and 65535 (got -1)"),
        ({"port": 65536}, "port must be between 0 and 65535 (got 65536)"),
        ({"port": True}, "port must be between 0 and 65535 (got True)"),
        ({"port": "80"}, "port must be between 0 and 65535 (got '80')"),
        ({"max_body_mb": 0}, "max_body_mb must be a number of at least 0.001 (got 0)"),
        ({"max_body_mb": 1e7}, "max_body_mb must be a number of at least 0.001 (got 10000000.0)"),
        ({"batch_wait_ms": -1}, "batch_wait_ms must be a number of at least 0.0 (got -1)"),
        ({"body_timeout_s": 0}, "body_timeout_s must be a number of at least 0.001 (got 0)"),
        ({"body_timeout_s": True}, "body_timeout_s must be a number of at least 0.001 (got True)"),
        ({"max_batch": 0}, "max_batch must be at least 1 (got 0)"),
        ({"queue_size": 0}, "queue_size must be at least 1 (got 0)"),
        ({"max_inputs": 0}, "max_inputs must be at least 1 (got 0)"),
        ({"api_key": " "}, "api_key is blank: an API key must hold printable characters"),
    ])


# -- the API key ---------------------------------------------------------------------------------


def test_an_api_key_is_printable_text_without_surrounding_white_space():
    assert check_api_key("s3cret-key", "where") == "s3cret-key"
    assert check_api_key("ключ", "where") == "ключ"  # printable beyond ASCII; sent as UTF-8
    blank = "where is blank: an API key must hold printable characters"
    printable = "where must be printable characters without surrounding white space"
    cases = [("", blank), ("   ", blank), ("\t\n", blank), (None, blank),
             ("\ufeffs3cret", "where starts with a byte order mark (BOM): save the key without one"),
             (" s3cret", printable), ("s3cret ", printable), ("s3\x00cret", printable), ("s3\x7fcret", printable),
             ("s3\ncret", printable), ("s3\u200bcret", printable)]
    for key, message in cases:
        with pytest.raises(OptionError) as caught:
            check_api_key(key, "where")
        assert str(caught.value) == message, repr(key)


def test_read_api_key_takes_the_first_line_of_the_file_before_the_environment(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(" \ts3cret\t\r\nsecond line\n", encoding="utf-8")
    assert read_api_key(str(key_file), {API_KEY_ENV: "other"}) == "s3cret"  # spaces and tabs around are dropped
    key_file.write_bytes(b"s3cret")  # no line break at the end
    assert read_api_key(str(key_file), {}) == "s3cret"


def test_read_api_key_names_a_file_that_holds_no_usable_key(tmp_path):
    key_file = tmp_path / "key"
    for content in (b"", b"\n", b"   \r\nkey on the second line\n"):
        key_file.write_bytes(content)
        with pytest.raises(InputError) as caught:
            read_api_key(str(key_file), {API_KEY_ENV: "other"})
        assert str(caught.value) == f"--api-key-file {key_file} is empty: its first line must be the key"
    key_file.write_bytes("\ufeffs3cret\n".encode())  # saved by an editor that writes a BOM
    with pytest.raises(OptionError) as caught:
        read_api_key(str(key_file), {})
    assert str(caught.value) == (
        f"the first line of --api-key-file {key_file} starts with a byte order mark (BOM): save the key without one")
    key_file.write_bytes(b"s3\x01cret\n")
    with pytest.raises(OptionError, match="must be printable characters without surrounding white space$"):
        read_api_key(str(key_file), {})
    key_file.write_bytes(b"\xffs3cret\n")
    with pytest.raises(InputError, match=f"^cannot read --api-key-file {key_file}: .*utf-8"):
        read_api_key(str(key_file), {})
    with pytest.raises(InputError) as caught:
        read_api_key(str(tmp_path / "missing"), {})
    assert str(caught.value) == f"cannot read --api-key-file {tmp_path / 'missing'}: No such file or directory"


def test_api_key_from_the_environment(monkeypatch):
    assert read_api_key(None, {}) is None and client_api_key({}) is None  # no key: none needed, none sent
    for read in (lambda env: read_api_key(None, env), client_api_key):
        assert read({API_KEY_ENV: " s3cret\n"}) == "s3cret"
        for value, rule in (("", "is blank"), ("  ", "is blank"), ("\ufeffs3cret", "starts with a byte order mark"),
                            ("s3\x1bcret", "must be printable")):
            with pytest.raises(OptionError) as caught:
                read({API_KEY_ENV: value})
            assert caught.value.name == API_KEY_ENV and str(caught.value).startswith(f"{API_KEY_ENV} {rule}")
    monkeypatch.setenv(API_KEY_ENV, "from-the-env")
    assert client_api_key() == "from-the-env" and read_api_key(None) == "from-the-env"  # os.environ by default


# -- RayOptions ----------------------------------------------------------------------------------


def test_ray_options_rules_and_their_messages():
    default = RayOptions()
    assert (default.address, default.actors, default.gpus_per_actor, default.cpus_per_actor, default.quiet_ray) == (
        None, 1, 0, None, True)
    for value in (0.25, 1, 2, 2.0):
        assert RayOptions(gpus_per_actor=value, cpus_per_actor=value).gpus_per_actor == value
    check_messages(RayOptions, [
        ({"actors": 0}, "actors must be a whole number, at least 1 (got 0)"),
        ({"actors": True}, "actors must be a whole number, at least 1 (got True)"),
        ({"actors": 1.5}, "actors must be a whole number, at least 1 (got 1.5)"),
        ({"gpus_per_actor": -1}, "gpus_per_actor must be a number, at least 0 (got -1)"),
        ({"gpus_per_actor": float("nan")}, "gpus_per_actor must be a number, at least 0 (got nan)"),
        ({"gpus_per_actor": True}, "gpus_per_actor must be a number, at least 0 (got True)"),
        ({"cpus_per_actor": "2"}, "cpus_per_actor must be a number, at least 0 (got '2')"),
        ({"gpus_per_actor": 1.5}, "gpus_per_actor must be a whole number when above 1 (got 1.5)"),
        ({"cpus_per_actor": 2.5}, "cpus_per_actor must be a whole number when above 1 (got 2.5)"),
    ])


def test_int8_runs_on_the_cpu_only_one_rule_for_the_model_and_for_ray():
    int8 = LoadOptions(quantize="int8")
    RayOptions().check_load(int8)  # CPU actors: fine
    RayOptions(gpus_per_actor=0.5).check_load(LoadOptions())  # GPUs without int8: fine
    with pytest.raises(OptionError) as caught:
        RayOptions(gpus_per_actor=0.5).check_load(int8)
    assert str(caught.value) == f"quantize {INT8_CPU_ONLY}: use no GPUs per actor"
    assert str(refused(LoadOptions, quantize="int8", device="cuda:0")) == f"quantize {INT8_CPU_ONLY}: use device cpu"
