"""CLI hardening (audit B): malformed bench files, Ctrl-C in bench rows, usage errors exit 2,
write failures naming the file, backend option values, up-front output checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from rpiae.cli.main import main

REPO = Path(__file__).resolve().parents[1]


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(r, code: int) -> None:
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output


# -- 1. malformed bench results / eval reports ---------------------------------------------------
@pytest.mark.parametrize("content, why", [
    (json.dumps([1, 2]), "a list"),
    (json.dumps({"format": "rpiae-bench"}), "'model' is missing"),
    (json.dumps({"format": "rpiae-bench", "model": {}, "settings": {}, "rows": [{"graph": "encode"}]}), "rows[0]"),
    (json.dumps({"format": "rpiae-bench", "model": {}, "settings": {}, "rows": [],
                 "machine": {"cpu": "x"}}), "cannot render"),
    (b"\x93NUMPY\x01\x00\xff\xfe binary", "not UTF-8"),
])
def test_bench_report_malformed_file_is_one_line_naming_it(tmp_path, content, why):
    f = tmp_path / "r.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = _run("bench", "--report", f)
    _one_line_error(r, 1)
    assert r.output.startswith(f"Error: {f}: not an rpiae bench result") and why in r.output, r.output
    assert r.output.count("\n") == 1


@pytest.mark.parametrize("content", [json.dumps([1]), json.dumps({"reference": "x", "rows": [1]}), b"\xff\xfe\x00"])
def test_bench_accuracy_malformed_file_is_one_line_naming_it(tmp_path, content):
    f = tmp_path / "acc.json"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = _run("bench", "-m", tmp_path, "--accuracy", f, "-o", tmp_path / "b.json")
    _one_line_error(r, 1)
    assert r.output.startswith(f"Error: {f}: not an rpiae eval report"), r.output
    assert not (tmp_path / "b.json").exists()


# -- 2. Ctrl-C while a row's child process runs -----------------------------------------------------
def slow_child(seconds: float) -> dict:
    """A row stand-in that takes its time starting (imports torch) and then running."""
    import torch  # noqa: F401

    time.sleep(seconds)
    return {"status": "ok"}


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@pytest.mark.skipif(not hasattr(signal, "pthread_sigmask"), reason="POSIX signal masks")
@pytest.mark.parametrize("delay", [0.05, 4.0])  # while the child starts (imports), while it runs
def test_interrupt_during_a_row_is_quiet_in_the_child(tmp_path, delay):
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        "from rpiae.bench.row import run_in_child\n"
        "from tests.test_cli_hardening_b import slow_child\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        "        run_in_child(slow_child, 120, threads=1)\n"
        "    except KeyboardInterrupt:\n"
        "        print('Interrupted', file=sys.stderr)\n"
        "        sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while not _children(proc.pid) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert _children(proc.pid), "the row's child process never started"
    time.sleep(delay)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().endswith("Interrupted") and time.monotonic() - start < 30


# -- 3. usage errors exit 2, naming the option ----------------------------------------------------
USAGE = [
    (["export", "-p", "fp8", "-o", "{t}/b"], "--precision"),
    (["export", "--batch", "abc", "-o", "{t}/b"], "--batch"),
    (["export", "--batch", "8:4", "-o", "{t}/b"], "--batch"),
    (["export", "--int8-keep", "bogus", "-o", "{t}/b"], "--int8-keep"),
    (["verify", "-m", "{t}", "-p", "fp8"], "--precision"),
    (["verify", "-m", "{t}", "-d", "bogus"], "--device"),
    (["verify", "-m", "{t}", "-b", "openvino", "-O", "hint=fast"], "--backend-option"),
    (["verify", "-m", "{t}", "-b", "openvino", "-O", "int8_rest=fp8"], "--backend-option"),
    (["verify", "-m", "{t}", "-b", "ort", "-O", "threads=0"], "--backend-option"),
    (["verify", "-m", "{t}", "-b", "openvino", "-O", "threads=-1"], "--backend-option"),
    (["bench", "-m", "{t}", "-p", "fp8"], "--precision"),
    (["bench", "-m", "{t}", "--graphs", "bogus"], "--graphs"),
    (["bench", "-m", "{t}", "--backends", "bogus"], "--backends"),
    (["bench", "-m", "{t}", "-d", "bogus"], "--device"),
    (["eval", "-m", "{t}", "-b", "openvino", "-O", "hint=fast", "{t}"], "--backend-option"),
    (["eval", "-m", "{t}", "-b", "ort", "-O", "threads=0", "{t}"], "--backend-option"),
    (["eval", "-m", "{t}", "-d", "cuda:x", "{t}"], "--device"),
    (["eval", "-m", "{t}", "-p", "fp8", "{t}"], "--precision"),
]


@pytest.mark.parametrize("args, option", USAGE, ids=[" ".join(a[:1] + a[a.index(o) if o in a else -3:][:2])
                                                     for a, o in USAGE])
def test_bad_option_values_are_usage_errors(tmp_path, args, option):
    r = _run(*[a.format(t=tmp_path) for a in args])
    assert r.exit_code == 2, r.output
    assert option in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "b").exists()


def test_backend_option_values_are_checked_when_parsed():
    from rpiae.engines import backend_options

    assert backend_options("openvino", {"hint": "throughput", "threads": "2"}) == {"hint": "throughput", "threads": 2}
    for bad in ({"hint": "fast"}, {"int8_rest": "fp8"}, {"threads": "0"}):
        with pytest.raises(ValueError, match="openvino option"):
            backend_options("openvino", bad)
    with pytest.raises(ValueError, match="ort option threads: expected an integer >= 1"):
        backend_options("ort", {"threads": "-1"})


# -- 4. write failures and malformed inputs name the file ---------------------------------------------
def test_onnx_write_failure_names_the_file(tmp_path, monkeypatch):
    import onnx

    from rpiae.export import onnx_export
    from rpiae.fileio import WriteError

    model = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))

    def full(*a, **k):
        raise OSError("problem writing element 122880 to file")  # numpy's text: no errno, no file

    monkeypatch.setattr(onnx_export.onnx, "save_model", full)
    monkeypatch.setattr(onnx_export.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    target = tmp_path / "encode.fp32.onnx"
    with pytest.raises(WriteError, match=rf"^cannot write {target}: problem writing element 122880 to file "
                                         r"\(No space left on device"):
        onnx_export.save_onnx(model, target)

    def enospc(*a, **k):
        raise RuntimeError("export failed") from OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_export.onnx, "save_model", enospc)
    with pytest.raises(WriteError, match=rf"^cannot write {target}: \[Errno 28\] No space left on device$"):
        onnx_export.save_onnx(model, target)

    def unrelated(*a, **k):
        raise ValueError("not a write failure")

    monkeypatch.setattr(onnx_export.onnx, "save_model", unrelated)
    with pytest.raises(ValueError, match="not a write failure"):
        onnx_export.save_onnx(model, target)


@pytest.mark.parametrize("content", ["torch==2.0 @@@\n", "torch>=2\n", b"\xff\xfe\x00binary"])
def test_malformed_constraints_file_names_it(tmp_path, content):
    f = tmp_path / "gpu-cu12.txt"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = _run("doctor", "--check-constraints", f)
    _one_line_error(r, 1)
    assert r.output.startswith(f"Error: {f}: "), r.output
    assert r.output.count("\n") == 1


# -- 5. outputs checked before the work; the documented exit codes ------------------------------------
def test_eval_refuses_an_unwritable_output_before_the_run(tmp_path, monkeypatch):
    from rpiae.jobs import evaluate

    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("ran before checking the outputs"))
    (tmp_path / "file").write_text("")
    for out in ("/proc/x.json", tmp_path / "file" / "x.json", tmp_path):
        r = _run("eval", "--json", out, tmp_path / "no-such-data")
        _one_line_error(r, 1)
        assert r.output.startswith(f"Error: cannot write {out}"), r.output
    r = _run("eval", "--grid", "/proc/g.png", tmp_path / "no-such-data")
    assert r.exit_code == 1 and "cannot write /proc/g.png" in r.output


def test_help_lists_every_exit_code():
    r = _run("--help")
    text = " ".join(r.output.split())
    assert "0 success, 1 error, 2 usage error, 3 a parity check failed, 130 interrupted (Ctrl-C)" in text
