"""`perceiver ray-fill` and the Ray Data pieces (perceiver_cli/ray_fill.py), on a real local
Ray: one cluster for the whole module (`ray.init(num_cpus=2)`, at most 2 actors), the tiny
random checkpoint, a few dozen lines. The command runs as a real process that joins that
cluster with --address; the actor-restart case runs the same driver code in this process
with an actor class that kills its own process once."""

from __future__ import annotations

import json
import os
import pty
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")  # the test extra installs it (pip install '.[test]')

from typer.testing import CliRunner  # noqa: E402

from perceiver_cli import ray_fill as rf  # noqa: E402
from perceiver_cli.cli import app  # noqa: E402
from perceiver_cli.corpus import JOURNAL, OutputFolder, expand_inputs  # noqa: E402
from perceiver_cli.filler import MaskFiller  # noqa: E402
from perceiver_cli.options import FillOptions, LoadOptions, RayOptions  # noqa: E402
from perceiver_cli.ray_session import RaySession  # noqa: E402

from .conftest import ctrl_c_reaches_it, perceiver, process_env, read_pty  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    # Ray Data's own: its DataContext.copy() deep-copies every field, the deprecated ones too, and each warns
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context"),
]

BATCH = "3"  # texts per pass: chunks of 12 lines, so the longer files span several blocks
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray for the module; its address for `ray-fill --address`. Its processes
    inherit an environment without network (the Hub on a closed port) and their own cache."""
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path_factory.mktemp("ray_hf_home"))}
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)  # a GPU in name only
        try:
            yield ray.get_runtime_context().gcs_address
        finally:
            ray.shutdown()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def corpus(root: Path) -> dict[str, Path]:
    """Input files with blank lines, failing lines, multi-byte UTF-8, invalid UTF-8, CRLF and
    a last line without a newline, in three shapes of input (a file, a directory, a glob)."""
    many = [f"line {i} of the corpus: the [MASK:{1 + i % 4}] went {'far ' * (i % 5)}away." for i in range(1, 26)]
    many[4] = ""
    many[9] = " \t "
    many[11] = "\u3000\x1c"  # not blank for batch mode (bytes.strip): an error, no marker
    many[13] = "no marker on this line"
    many[17] = "a bad marker [MASK:0] here"
    many[20] = "[MASK:90] longer than the tiny model's window"
    files = {
        "a": write(root / "a.txt", ("\n".join(many) + "\n").encode()),
        "b": write(root / "dir" / "b.txt",
                   "café naïve [MASK:3] €\r\n日本語の[MASK:4]です\n\n🙂 emoji [MASK] end\nlast [MASK:2]".encode()),
        "c": write(root / "dir" / "sub" / "c.txt", b"bytes \xff\xfe not utf-8 [MASK:2] ok\n"),
        "empty": write(root / "dir" / "sub" / "empty.txt", b""),
        "hidden": write(root / "dir" / ".hidden.txt", b"never read [MASK:2]\n"),
        "d": write(root / "globbed" / "d.txt", "d [MASK:2] ü\n".encode()),
    }
    return files


def batch_records(checkpoint: Path, path: Path, *args: str) -> list[dict]:
    """What `perceiver fill --batch PATH --json` writes for each line (the reference)."""
    result = CliRunner().invoke(app, ["fill", "-m", str(checkpoint), "--batch", str(path), "--json",
                                      "--batch-size", BATCH, *args])
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def read_output(directory: Path) -> dict[str, list[dict]]:
    """Each output file's records, by file name (hidden partial files must not remain; the
    journal of --resume is the one hidden file)."""
    names = sorted(n for n in os.listdir(directory) if n != JOURNAL)
    assert not [n for n in names if n.startswith(".")], names
    return {name: [json.loads(line) for line in (directory / name).read_text("utf-8").splitlines()] for name in names}


def assert_same_record(got: dict, want: dict) -> None:
    """Equal to the batch record: the same keys, text, fills and bytes; log-probabilities
    within LOGPROB_TOLERANCE."""
    got = dict(got)
    got.pop("file")
    assert got.keys() == want.keys()
    assert {k: v for k, v in got.items() if k != "spans"} == {k: v for k, v in want.items() if k != "spans"}
    assert len(got.get("spans", [])) == len(want.get("spans", []))
    for g, w in zip(got.get("spans", []), want.get("spans", [])):
        assert {k: v for k, v in g.items() if k != "logprob"} == {k: v for k, v in w.items() if k != "logprob"}
        assert abs(g["logprob"] - w["logprob"]) <= LOGPROB_TOLERANCE


def check_against_batch(checkpoint: Path, outputs: dict[str, list[dict]], given: list[tuple[str, Path]], *args: str):
    """Every (file, line) exactly once, each record equal to `fill --batch --json` on its
    file; `given` is [(the path as ray-fill names it, the file)] in input order."""
    names = sorted(outputs)
    assert len(names) == len(given)
    seen = [(r["file"], r["line"]) for name in names for r in outputs[name]]
    assert len(seen) == len(set(seen))
    for name, (as_given, path) in zip(names, given):
        assert name.endswith(f"-{path.name}.jsonl")
        want = batch_records(checkpoint, path, *args)
        got = outputs[name]
        assert [r["file"] for r in got] == [as_given] * len(want)
        assert [r["line"] for r in got] == list(range(1, len(want) + 1))
        for g, w in zip(got, want):
            assert_same_record(g, w)


# -- the command, as a real process on the shared cluster ----------------------------------------


def test_ray_fill_every_line_once_equal_to_batch(cluster, tiny_checkpoint, tmp_path):
    files = corpus(tmp_path / "in")
    out = tmp_path / "out"
    proc = subprocess.run(
        perceiver("ray-fill", "in/a.txt", "in/dir", "in/glob*/*.txt", "in/a.txt", "-o", "out", "--address", cluster,
                  "--actors", "2", "-m", str(tiny_checkpoint), "--batch-size", BATCH),
        capture_output=True, env=process_env(tmp_path), timeout=300, cwd=tmp_path)
    stderr = proc.stderr.decode()
    assert proc.returncode == 1, stderr  # lines failed
    # the summary of fill --batch, and nothing else (Ray's own messages stay off stderr)
    assert stderr == "25 filled, 4 failed, 3 blank passed through\n"
    assert proc.stdout == b""
    outputs = read_output(out)
    given = [("in/a.txt", files["a"]), ("in/dir/b.txt", files["b"]), ("in/dir/sub/c.txt", files["c"]),
             ("in/dir/sub/empty.txt", files["empty"]), ("in/globbed/d.txt", files["d"])]
    assert sorted(outputs) == ["00001-a.txt.jsonl", "00002-b.txt.jsonl", "00003-c.txt.jsonl", "00004-empty.txt.jsonl",
                               "00005-d.txt.jsonl"]
    check_against_batch(tiny_checkpoint, outputs, given)
    records = [r for name in sorted(outputs) for r in outputs[name]]
    assert list(records[0])[:2] == ["file", "line"]
    assert [r["line"] for r in records if "error" in r] == [12, 14, 18, 21]
    assert "日本語の" in outputs["00002-b.txt.jsonl"][1]["text"]
    assert outputs["00004-empty.txt.jsonl"] == []


def test_ray_fill_exit_0_and_progress_on_a_terminal(cluster, tiny_checkpoint, tmp_path):
    source = write(tmp_path / "ok.txt", "".join(f"ok {i} [MASK:2] fine\n" for i in range(30)).encode() + b"\n")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        perceiver("ray-fill", str(source), "-o", str(tmp_path / "out"), "--address", cluster, "--actors", "2",
                  "-m", str(tiny_checkpoint), "--strategy", "oneshot", "-k", "2", "--batch-size", BATCH),
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=process_env(tmp_path, COLUMNS="100"))
    os.close(slave)
    shown = read_pty(master).decode(errors="replace")
    os.close(master)
    assert proc.wait(timeout=300) == 0, shown
    assert "lines/s" in shown  # the progress bar
    assert "30 filled, 0 failed, 1 blank passed through (1 files in" in shown
    outputs = read_output(tmp_path / "out")
    check_against_batch(tiny_checkpoint, outputs, [(str(source), source)], "--strategy", "oneshot", "-k", "2")
    assert len(outputs["00001-ok.txt.jsonl"][0]["spans"][0]["candidates"]) == 2


def test_actors_that_ask_for_gpus(cluster, tiny_checkpoint, tmp_path):
    """--gpus-per-actor on a cluster that has one (in name: the actors run on the CPU); on a
    local Ray without any, exit 2 instead of waiting for it forever."""
    source = write(tmp_path / "in.txt", "".join(f"gpu {i} [MASK:2] here\n" for i in range(15)).encode())
    ran = subprocess.run(perceiver("ray-fill", str(source), "-o", str(tmp_path / "out"), "--address", cluster,
                                   "--gpus-per-actor", "0.5", "--device", "cpu", "-m", str(tiny_checkpoint),
                                   "--batch-size", BATCH), capture_output=True, env=process_env(tmp_path), timeout=300)
    assert ran.returncode == 0, ran.stderr
    check_against_batch(tiny_checkpoint, read_output(tmp_path / "out"), [(str(source), source)])
    local = subprocess.run(perceiver("ray-fill", str(source), "-o", str(tmp_path / "out2"), "--gpus-per-actor", "1",
                                     "-m", str(tiny_checkpoint)), capture_output=True, env=process_env(tmp_path),
                           timeout=300)
    assert local.returncode == 2
    assert local.stderr.decode().startswith("error: --gpus-per-actor asks for 1 GPU per actor, more than the 0 of the local Ray")


def test_an_unreachable_cluster_is_one_line_at_once(tmp_path):
    source = write(tmp_path / "in.txt", b"a [MASK:2] b\n")
    ran = subprocess.run(perceiver("ray-fill", str(source), "-o", str(tmp_path / "out"), "--address", "127.0.0.1:9"),
                         capture_output=True, env=process_env(tmp_path), timeout=60)
    assert ran.returncode == 1
    assert ran.stderr.decode().startswith("error: cannot reach the Ray cluster at 127.0.0.1:9: Connection refused")


def test_a_model_that_does_not_fit_is_one_line(cluster, tiny_checkpoint, tmp_path):
    """--max-span longer than the model's window: found by the actors, exit 2 as for fill;
    a model that is not there: exit 1. No output file is left behind."""
    source = write(tmp_path / "in.txt", b"a [MASK] b\n")
    runs = [subprocess.Popen(perceiver("ray-fill", str(source), "--address", cluster, "-o", str(tmp_path / f"out{i}"),
                                       *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=process_env(tmp_path))
            for i, args in enumerate((("-m", str(tiny_checkpoint), "--max-span", "100"),
                                      ("-m", str(tmp_path / "missing"))))]  # two folders: each run locks its own
    (out1, err1), (out2, err2) = (p.communicate(timeout=300) for p in runs)
    assert (runs[0].returncode, out1) == (2, b"")
    assert err1.decode() == "error: --max-span must be between 1 and 62 bytes, this model's window (got 100)\n"
    assert runs[1].returncode == 1
    assert err2.decode().startswith("error: local model directory") and err2.count(b"\n") == 1
    assert os.listdir(tmp_path / "out0") == os.listdir(tmp_path / "out1") == []


# -- before Ray: usage, inputs, no ray ----------------------------------------------------------


def test_bad_usage_and_unreadable_inputs_exit_2_before_ray(tmp_path):
    """Each case fails with one line and exit 2 without contacting Ray (the --address is a
    closed port: reaching it would be a different error, after a wait)."""
    write(tmp_path / "ok.txt", b"a [MASK:2] b\n")
    (tmp_path / "emptydir").mkdir()
    write(tmp_path / "file_not_dir", b"")
    unreadable = write(tmp_path / "secret.txt", b"x [MASK:2]\n")
    unreadable.chmod(0)
    (tmp_path / "done").mkdir()
    write(tmp_path / "done" / "old.jsonl", b"{}\n")
    os.mkfifo(tmp_path / "pipe")  # no writer: opening it would wait forever
    cases = {
        ("-",): "ray-fill reads files, not standard input",
        ("empt*",): "no file matches empt*",  # a glob of directories without files
        ("done/old.jsonl", "-o", "done"): "done/old.jsonl is inside --output done",
        ("done", "-o", "done"): "done is a directory without files to read outside --output",
        ("missing.txt",): "cannot read missing.txt",
        ("emptydir",): "emptydir is a directory without files to read",
        ("nomatch/*.txt",): "no file matches nomatch/*.txt",
        ("ok.txt", "--actors", "0"): "--actors must be a whole number, at least 1 (got 0)",
        ("ok.txt", "--gpus-per-actor", "-1"): "--gpus-per-actor must be a number, at least 0",
        ("ok.txt", "--strategy", "bogus"): "--strategy must be one of",
        ("ok.txt", "--batch-size", "0"): "--batch-size must be between 1 and 256",
        ("ok.txt", "--quantize", "int8", "--gpus-per-actor", "1"): "int8 runs on the CPU only",
        ("ok.txt", "-o", "file_not_dir"): "--output file_not_dir is not a directory",
        ("ok.txt", "--bogus"): "No such option: --bogus",
        ("ok.txt", "pipe"): "pipe is a named pipe, not a regular file: ray-fill reads files",
        ("/dev/null",): "/dev/null is a device, not a regular file",
    }
    if os.geteuid() != 0:  # root reads any file
        cases[("ok.txt", "secret.txt")] = "cannot read secret.txt: Permission denied"
    procs = {}
    for args, _ in cases.items():
        out = [] if "-o" in args else ["-o", "out"]
        procs[args] = subprocess.Popen(perceiver("ray-fill", *args, *out, "--address", "127.0.0.1:9"), cwd=tmp_path,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=process_env(tmp_path))
    for args, words in cases.items():
        stdout, stderr = procs[args].communicate(timeout=60)
        lines = stderr.decode().splitlines()
        assert procs[args].returncode == 2, (args, stderr)
        assert stdout == b"" and len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], (args, lines)
    assert not (tmp_path / "out").exists()  # nothing made before the inputs were checked


def test_a_second_run_on_the_output_folder_is_exit_2_at_once(tmp_path):
    """While a run holds DIR's lock, another run on DIR writes nothing and does not reach Ray
    (the closed --address would be exit 1)."""
    write(tmp_path / "ok.txt", b"a [MASK:2] b\n")
    write(tmp_path / "out" / "00001-ok.txt.jsonl", b"the first run's\n")
    with OutputFolder(tmp_path / "out"):
        proc = subprocess.run(perceiver("ray-fill", "ok.txt", "-o", "out", "--address", "127.0.0.1:9"), cwd=tmp_path,
                              capture_output=True, env=process_env(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.decode() == ("error: another run is writing to --output out (it holds the folder's lock): wait "
                                    "for it to end, or write elsewhere\n")
    assert os.listdir(tmp_path / "out") == ["00001-ok.txt.jsonl"]
    assert (tmp_path / "out" / "00001-ok.txt.jsonl").read_bytes() == b"the first run's\n"


def test_inputs_skip_the_output_directory_and_links_to_nowhere(tmp_path):
    data = tmp_path / "data"
    (data / "out").mkdir(parents=True)
    write(data / "a.txt", b"a [MASK:2]\n")
    write(data / "out" / "00001-a.txt.jsonl", b"{}\n")  # an earlier run's result
    (data / "gone.txt").symlink_to(tmp_path / "nowhere")
    found = [i.path for i in expand_inputs([str(data)], data / "out")]
    assert found == [str(data / "a.txt")]
    assert [i.path for i in expand_inputs([str(data / "**")], data / "out")] == found


def test_without_ray_one_line_how_to_install(tmp_path):
    """`perceiver --help` and `ray-fill --help` never import ray; `ray-fill` without it says
    how to install the extra (exit 2). A `ray` that fails to import stands for none."""
    fake = write(tmp_path / "fake" / "ray" / "__init__.py", b"raise ImportError('No module named ray (test)')\n")
    env = process_env(tmp_path, PYTHONPATH=str(fake.parent.parent))
    write(tmp_path / "ok.txt", b"a [MASK:2] b\n")
    for args in (["--help"], ["ray-fill", "--help"]):
        proc = subprocess.run(perceiver(*args), capture_output=True, env=env, timeout=60)
        assert proc.returncode == 0 and b"ray-fill" in proc.stdout, proc.stderr
    proc = subprocess.run(perceiver("ray-fill", "ok.txt", "-o", "out"), capture_output=True, env=env, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.decode().startswith("error: perceiver ray-fill needs Ray Data: pip install 'perceiver-cli[ray]'")
    assert proc.stderr.count(b"\n") == 1


def test_only_ray_fill_imports_ray():
    import re

    package = Path(rf.__file__).parent
    for path in package.glob("*.py"):
        if path.name != "ray_fill.py":
            assert not re.search(r"^\s*(import ray\b|from ray\b)", path.read_text(), re.M), path


def test_long_and_latin_1_file_names(cluster, tiny_checkpoint, tmp_path):
    """A 244-byte name (legal; its output name and partial name were past NAME_MAX: the run
    failed after Ray started, with no output at all) gets a shortened output name; a name
    that is not UTF-8 is valid JSON in "file", the very bytes back with surrogateescape.
    Nothing on stderr: no line from Ray either."""
    long = write(tmp_path / ("n" * 240 + ".txt"), b"long [MASK:2] name\n")
    latin = write(Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.txt")), b"latin [MASK:2] name\nno marker\n")
    proc = subprocess.run(perceiver("ray-fill", str(long), str(latin), "-o", str(tmp_path / "out"), "--address",
                                    cluster, "-m", str(tiny_checkpoint), "--batch-size", BATCH),
                          capture_output=True, env=process_env(tmp_path), timeout=300)
    assert proc.returncode == 1 and proc.stderr == b"2 filled, 1 failed\n"  # "no marker" failed: the summary, only
    names = sorted(n for n in os.listdir(tmp_path / "out") if n != JOURNAL)
    assert len(names) == 2 and all(len(os.fsencode(n)) <= 246 for n in names)
    assert names[1] == os.fsdecode(b"00002-caf\xe9.txt.jsonl")
    for name, path in zip(names, (long, latin)):
        data = (tmp_path / "out" / name).read_bytes()
        data.decode("utf-8")  # valid UTF-8 ...
        got = [json.loads(line) for line in data.splitlines()]  # ... and valid JSON
        assert [r["file"].encode("utf-8", "surrogateescape") for r in got] == [bytes(path)] * len(got)
        for g, w in zip(got, batch_records(tiny_checkpoint, path)):
            assert_same_record(g, w)


def no_files_past(size: int):
    """`preexec_fn`: files this process writes may not grow past `size` bytes (a write past it
    fails, EFBIG), as on a disk that is full."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the error, not the signal that would kill the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_a_write_that_fails_mid_run_leaves_no_partial_file_and_one_line(cluster, tiny_checkpoint, tmp_path):
    """The output cannot grow (as on a full disk) while the actors work: exit 1, one error line,
    no partial file left (the old cleanup failed a second time and left it), and nothing from
    Ray on either stream (its error listener printed `(raylet) Task ... submit failed` on
    stdout as the failed run stopped its actors)."""
    source = write(tmp_path / "big.txt", "".join(f"line {i}: the [MASK:3] went away\n" for i in range(300)).encode())
    proc = subprocess.run(perceiver("ray-fill", str(source), "-o", str(tmp_path / "out"), "--address", cluster,
                                    "-m", str(tiny_checkpoint), "--batch-size", BATCH, "-k", "3"),
                          capture_output=True, env=process_env(tmp_path), timeout=300, preexec_fn=no_files_past(20_000))
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, b"", b"error: File too large\n")
    assert os.listdir(tmp_path / "out") == [JOURNAL]


def test_while_a_run_lasts_rays_prints_go_to_its_log(cluster, capfd):
    """Ray's C++ core writes on descriptor 2 and its error listener prints on sys.stdout
    (`(raylet) Task ... submit failed`, as a failed run stops its actors): both go to the
    run's log, which is removed after a run that did not fail; our messages stay on stderr."""
    with RaySession(ray, RayOptions()) as session:
        print("(raylet) Task MapWorker(MapBatches(RecordFill)).submit failed")
        os.write(2, b"[core] a native notice\n")
        sys.stderr.write("ours\n")
        sys.stdout.flush()
        logged = Path(session.log).read_text()
    out, err = capfd.readouterr()
    assert (out, err) == ("", "ours\n")
    assert "submit failed" in logged and "a native notice" in logged
    assert not os.path.exists(session.log)


def ray_fill_as_batch(cluster: str, checkpoint: Path, tmp_path: Path, source: Path, *args: str) -> tuple[int, list]:
    """`ray-fill SOURCE ARGS` on the cluster, its output checked against `fill --batch
    --json ARGS`: its exit status and records."""
    proc = subprocess.run(perceiver("ray-fill", str(source), "-o", str(tmp_path / "out"), "--address", cluster,
                                    "-m", str(checkpoint), "--batch-size", BATCH, *args),
                          capture_output=True, env=process_env(tmp_path), timeout=300)
    assert proc.returncode in (0, 1), proc.stderr
    outputs = read_output(tmp_path / "out")
    check_against_batch(checkpoint, outputs, [(str(source), source)], *args)
    return proc.returncode, outputs[f"00001-{source.name}.jsonl"]


def test_choices_as_in_fill_batch(cluster, tiny_checkpoint, tmp_path):
    source = write(tmp_path / "in.txt", "".join(f"the {w} [MASK] sat on it\n" for w in ("cat", "dog", "bird")).encode())
    choices = ("--choice", "mat", "--choice", "dog", "--choice", "hat")
    code, records = ray_fill_as_batch(cluster, tiny_checkpoint, tmp_path, source, *choices)
    assert code == 0
    assert {r["spans"][0]["fill"].strip() for r in records} <= {"mat", "dog", "hat"}


def test_the_budget_flags_as_in_fill_batch(cluster, tiny_checkpoint, tmp_path):
    source = write(tmp_path / "in.txt", b"Hello [MASK:3] world.\nA [MASK] B [MASK] C [MASK] D.\nx [MASK:1] y\n")
    budget = ("--max-inputs", "4", "--max-search", "100")  # the second line takes 9 model inputs
    code, records = ray_fill_as_batch(cluster, tiny_checkpoint, tmp_path, source, *budget)
    assert code == 1 and "over the budget's 4 (--max-inputs)" in records[1]["error"]


# -- --resume: runs stopped at several points ------------------------------------------------------


def stop_when(args: list[str], tmp_path: Path, ready, sig: int) -> tuple[int, str]:
    """Run `ray-fill ARGS`, send it `sig` once `ready()` holds; its exit status and stderr."""
    proc = subprocess.Popen(perceiver("ray-fill", *args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=process_env(tmp_path), preexec_fn=ctrl_c_reaches_it)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not ready():
            time.sleep(0.002)
        assert proc.poll() is None, "the run ended before the point to stop it"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc.returncode, err.decode()


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_resume_after_ctrl_c_and_kills_equals_an_uninterrupted_run(cluster, tiny_checkpoint, tmp_path):
    for name, n in (("a", 70), ("b", 70), ("c", 30)):
        write(tmp_path / "in" / f"{name}.txt",
              "".join(f"{name} {i}: the [MASK:{1 + i % 3}] went {'far ' * (i % 4)}away\n" for i in range(n)).encode())
    common = ["-m", str(tiny_checkpoint), "--address", cluster, "--batch-size", "1", "-k", "2", "in"]
    whole = subprocess.run(perceiver("ray-fill", *common, "-o", "whole"), cwd=tmp_path, capture_output=True,
                           env=process_env(tmp_path), timeout=300)
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "out"
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        # Ctrl-C in a.txt: exit 130, what is done kept, one line on how to go on
        code, err = stop_when([*common, "-o", "out"], tmp_path, lambda: lines_in(out / ".00001-a.txt.jsonl.partial") >= 9,
                              signal.SIGINT)
        assert code == 130 and err == ("interrupted: 0 of 3 files complete in out; run again with --resume to go on\n"), (code, err)
        assert lines_in(out / ".00001-a.txt.jsonl.partial") >= 9
        # killed (the driver lost: no cleanup at all) once a.txt is complete, then in the middle of b.txt
        code, _ = stop_when([*common, "-o", "out", "--resume"], tmp_path, lambda: (out / "00001-a.txt.jsonl").exists(),
                            signal.SIGKILL)
        assert code == -signal.SIGKILL
        first = os.stat(out / "00001-a.txt.jsonl")
        code, _ = stop_when([*common, "-o", "out", "--resume"], tmp_path,
                            lambda: lines_in(out / ".00002-b.txt.jsonl.partial") >= 30, signal.SIGKILL)
        assert code == -signal.SIGKILL and not (out / "00003-c.txt.jsonl").exists()
    finally:
        os.chdir(cwd)
    done = subprocess.run(perceiver("ray-fill", *common, "-o", "out", "--resume"), cwd=tmp_path, capture_output=True,
                          env=process_env(tmp_path), timeout=300)
    assert done.returncode == 0 and done.stderr == b"", done.stderr
    names = sorted(os.listdir(tmp_path / "whole"))
    assert names == sorted(os.listdir(out)) and len(names) == 4  # three files and the journal
    for name in names[1:] if names[0] == JOURNAL else names:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sum(lines_in(out / n) for n in names if n != JOURNAL) == 170
    again = os.stat(out / "00001-a.txt.jsonl")  # skipped by both resumed runs, not written again
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    # all done: a --resume has nothing to fill and starts no Ray (the closed --address would be exit 1)
    common[common.index("--address") + 1] = "127.0.0.1:9"
    idle = subprocess.run(perceiver("ray-fill", *common, "-o", "out", "--resume"), cwd=tmp_path, capture_output=True,
                          env=process_env(tmp_path), timeout=60)
    assert (idle.returncode, idle.stderr) == (0, b"")


# -- fault tolerance: an actor that dies ----------------------------------------------------------


def crash_once_class(flag: Path):
    """A RecordFill whose process exits (as if killed) the first time a batch holds the
    marker line; the flag file says it happened. Defined in a function so that Ray ships
    the class by value to its workers."""

    class CrashOnce(rf.RecordFill):
        def __call__(self, batch):
            if any(d is not None and b"CRASH-ONCE" in d for lines in batch.column("lines").to_pylist() for d in lines):
                try:
                    os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            return super().__call__(batch)

    return CrashOnce


def test_an_actor_that_dies_is_restarted_and_its_batch_redone(cluster, tiny_checkpoint, tmp_path):
    lines = [f"restart {i}: the [MASK:{1 + i % 3}] is here" for i in range(40)]
    lines[17] = "CRASH-ONCE the [MASK:3] is here"
    a = write(tmp_path / "a.txt", ("\n".join(lines) + "\n").encode())
    b = write(tmp_path / "b.txt", "".join(f"second file {i} [MASK:2]\n" for i in range(13)).encode())
    flag = tmp_path / "crashed"
    inputs = expand_inputs([str(a), str(b)])
    out = tmp_path / "out"
    with OutputFolder(out) as folder:
        tally = rf.run(inputs, folder, LoadOptions(model=str(tiny_checkpoint), batch_size=int(BATCH)), FillOptions(),
                       RayOptions(actors=2), worker=crash_once_class(flag))
    assert flag.exists()  # the actor did die, in the middle of the run
    assert (tally.filled, tally.failed, tally.blank, len(os.listdir(out)) - 1) == (53, 0, 0, 2)  # and the journal
    check_against_batch(tiny_checkpoint, read_output(out), [(str(a), a), (str(b), b)])


# -- the Python side for Ray users --------------------------------------------------------------


def test_fill_dataset_and_the_callable_class(cluster, tiny_checkpoint):
    texts = ["The capital of France is [MASK:6].", "", "no marker", "naïve café [MASK:3] 日本", "x [MASK] y"] * 3
    ds = ray.data.from_items([{"id": i, "text": t} for i, t in enumerate(texts)])
    load = LoadOptions(model=str(tiny_checkpoint), batch_size=2)
    with pytest.warns(UserWarning, match="take all 2 CPUs"):  # a read stage would starve: told, not hung
        rf.fill_dataset(ds, load, actors=2)
    filled = rf.fill_dataset(ds, load, FillOptions(strategy="oneshot"), actors=1, rows_per_call=4)
    rows = sorted(filled.take_all(), key=lambda r: r["id"])
    assert [r["text"] for r in rows] == texts
    filler = MaskFiller.from_pretrained(load)
    for row, text in zip(rows, texts):
        if not text.strip():
            assert (row["filled"], row["spans"], row["error"]) == (text, "[]", None)
            continue
        want = filler.fill_many([text], FillOptions(strategy="oneshot"), return_errors=True)[0]
        if isinstance(want, Exception):
            assert (row["filled"], row["spans"], row["error"]) == (None, None, str(want))
            continue
        assert row["error"] is None and row["filled"] == want.text
        spans = json.loads(row["spans"])
        assert [s["fill"] for s in spans] == [s.fill for s in want.spans]
        assert all(abs(s["logprob"] - w.logprob) <= LOGPROB_TOLERANCE for s, w in zip(spans, want.spans))

    # the class alone, outside Ray, on a pyarrow batch (the one format it takes)
    import pyarrow as pa

    batch = rf.MaskFill(load, {"strategy": "oneshot"})(pa.table({"text": texts[:5]}))
    assert batch.column("filled").to_pylist()[:2] == [rows[0]["filled"], ""]
    assert batch.column("error")[2].as_py().startswith("no [MASK] marker")
    with pytest.raises(TypeError, match="batch_format=\"pyarrow\""):
        rf.MaskFill(load)({"text": texts[:1]})


def test_the_actors_hold_each_line_to_the_runs_budget_and_name_its_flag(tiny_checkpoint):
    from perceiver_cli.options import Budget

    lines = [b"Hello [MASK:3] world.", b"A [MASK] B [MASK] C [MASK] D.", b"x [MASK:1] y"]  # 2, 9 and 1 model inputs
    actor = rf.RecordFill(LoadOptions(model=str(tiny_checkpoint), device="cpu"), FillOptions(), budget=Budget(max_inputs=4))
    chunk = actor._chunk(file=0, name=b"in.txt", first=1, skip=0, lines=lines)  # what an actor returns, without Ray
    records = [json.loads(r) for r in chunk["records"]]
    assert (chunk["filled"], chunk["failed"], chunk["fatal"]) == (2, 1, None)
    assert "text" in records[0] and "text" in records[2]
    assert records[1]["error"].startswith("the fill would take about 9 model inputs, over the budget's 4 (--max-inputs)")
    python = rf.MaskFill(str(tiny_checkpoint), column="text", budget={"max_inputs": 4})  # fill_dataset's: field names
    assert "(max_inputs)" in str(python.outcomes(lines[1:2])[0].result)


def test_a_ctrl_c_is_remembered_while_ray_handles_it():
    """Ray Data shuts its executor down while a KeyboardInterrupt passes through its
    iterator, and a failure there could take the interrupt's place: `run` asks
    `_interrupts` whether Ctrl-C came, whatever was raised."""
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with rf._interrupts() as seen:
            assert seen == []
            signal.raise_signal(signal.SIGINT)
    assert seen == [signal.SIGINT]
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back
    with rf._interrupts() as seen:
        pass
    assert seen == [] and signal.getsignal(signal.SIGINT) is before
