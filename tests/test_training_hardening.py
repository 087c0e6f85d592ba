"""`rpiae train` refuses what would lose or mix runs, and bad input is one line before anything
is written: an --out that holds a run, stages out of order, unreadable checkpoints, bad config
values; a resume keeps the run's own config and log; a killed checkpoint write is recovered;
a spawned child that cannot start says why. Tiny preset, one or two steps, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rpiae.training.checkpoint import read_training_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:skipping unreadable", "ignore:stage I without --init-encoder")

SMALL = dict(batch_size=1, num_workers=0, max_steps=1, resize_min=256, resize_max=256, epochs=1)
REPO = Path(__file__).resolve().parents[1]


def _sets(values: dict) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _cli(*args):
    from rpiae.cli.main import main

    return CliRunner().invoke(main, ["train", *map(str, args)])


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.output
    for n in needles:
        assert n in lines[0], (n, r.output)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("images")
    d = root / "nested"
    d.mkdir()
    for i, p in enumerate(photos[:3]):
        Image.fromarray((p.transpose(1, 2, 0) * 255).round().astype(np.uint8)).save(d / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def s1_run(tmp_path_factory, image_dir) -> Path:
    """A finished one-step stage-1 run (batch 1, 3 images: 3 steps per epoch)."""
    from rpiae.training.run import run_training

    out = tmp_path_factory.mktemp("runs") / "s1"
    run_training(1, image_dir, out, preset="tiny", no_lpips=True, no_gan=True, progress=False, overrides=dict(SMALL))
    return out


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# -- 1. an --out that holds a run is never overwritten -------------------------------------------------


def test_a_new_run_refuses_an_out_that_holds_a_run(s1_run, image_dir, tmp_path):
    run = _copy(s1_run, tmp_path / "ref")
    ckpt = run / "last" / "checkpoint.pt"
    before = (ckpt.read_bytes(), (run / "model.safetensors").read_bytes(), (run / "log.jsonl").read_text())
    r = _cli("--stage", 1, "--data", image_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--out", run,
             "--quiet", *_sets(SMALL))
    _one_line_error(r, "already holds a run", "new --out", f"--resume {run / 'last'}")
    # a new stage into the folder of the run it starts from
    r = _cli("--stage", 2, "--data", image_dir, "--resume", run / "last", "--out", run, "--quiet", *_sets(SMALL))
    _one_line_error(r, "new --out")
    r = _cli("--stage", 2, "--data", image_dir, "--resume", run / "last" / "checkpoint.pt", "--out", run,
             "--quiet", *_sets(SMALL))
    _one_line_error(r, "new --out")
    # continuing the same stage elsewhere may not land on another run either
    other = _copy(s1_run, tmp_path / "other")
    r = _cli("--stage", 1, "--data", image_dir, "--resume", other / "last", "--out", run, "--quiet")
    _one_line_error(r, "already holds a run")
    assert (ckpt.read_bytes(), (run / "model.safetensors").read_bytes(), (run / "log.jsonl").read_text()) == before


# -- 2. a stage starts from the previous stage's checkpoint --------------------------------------------


def test_a_stage_starts_only_from_the_previous_stage(s1_run, image_dir, tmp_path):
    r = _cli("--stage", 3, "--data", image_dir, "--resume", s1_run / "last", "--out", tmp_path / "s3",
             "--no-lpips", "--no-gan", "--quiet", *_sets(SMALL))
    _one_line_error(r, "stage 1 checkpoint", "stage 3 starts from a stage 2 checkpoint")
    assert not (tmp_path / "s3").exists()


# -- 3. unreadable checkpoints and bad values: one line, nothing written ---------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, ("true",))


def test_unreadable_checkpoints_are_one_line(image_dir, tmp_path):
    bad = {
        "pickle": lambda p: torch.save({"stage": 1, "config": {}, "x": _Evil()}, p),
        "text": lambda p: p.write_text("hello"),
        "empty": lambda p: p.write_bytes(b""),  # "is empty", not EOFError (click: "Aborted!")
        "list": lambda p: torch.save([1, 2], p),
        "no-config": lambda p: torch.save({"stage": 1, "config": {"bogus": 1}}, p),
    }
    for name, write in bad.items():
        ckpt = tmp_path / name / "last" / "checkpoint.pt"
        ckpt.parent.mkdir(parents=True)
        write(ckpt)
        for resume in (ckpt.parent, ckpt):
            r = _cli("--stage", 2, "--data", image_dir, "--resume", resume, "--out", tmp_path / f"o-{name}",
                     "--quiet", *_sets(SMALL))
            _one_line_error(r, "cannot resume from")
            assert "Aborted" not in r.output
            assert not (tmp_path / f"o-{name}").exists()


BAD_SETS = {
    "lr=0": "lr", "lr=-1": "lr", "log_every=0": "log_every", "betas=0.9": "betas", "max_steps=-5": "max_steps",
    "ema_decay=5": "ema_decay", "noise_tau=-3": "noise_tau", "min_lr=-1": "min_lr",
    "warmup_epochs=-1": "warmup_epochs", "decay_epochs=-1": "decay_epochs", "epoch_size=-4": "epoch_size",
    "crop=128": "crop", "disc_lr=0": "disc_lr", "batch_size=0": "batch_size", "lr=nan": "lr",
}


def test_bad_values_are_one_line_naming_the_field_before_out_exists(image_dir, tmp_path):
    out = tmp_path / "o"
    base = dict(SMALL)
    for item, field in BAD_SETS.items():
        key = item.split("=")[0]
        sets = _sets({k: v for k, v in base.items() if k != key}) + ["--set", item]
        r = _cli("--stage", 1, "--data", image_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--out", out,
                 "--quiet", *sets)
        _one_line_error(r, field)
        assert not out.exists(), item
    r = _cli("--stage", 1, "--data", image_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--out", out,
             "--set", "lr=abc")
    assert r.exit_code == 2 and "lr" in r.output and "Traceback" not in r.output


BAD_FILES = {
    '{"lr": "abc"}': "lr", '{"stage1": [1]}': "stage1", '{"batch_size": "2"}': "batch_size",
    '{"betas": 0.9}': "betas", '{"lr": 1e-4,': "not valid JSON", '[1]': "mapping", '{"stage1": {"ema_decay": 2}}': "ema_decay",
    '{"bogus": 1}': "bogus",
}


def test_config_file_errors_name_the_file_and_the_field(image_dir, tmp_path):
    out = tmp_path / "o"
    for i, (text, field) in enumerate(BAD_FILES.items()):
        cfg = tmp_path / f"c{i}.json"
        cfg.write_text(text)
        r = _cli("--stage", 1, "--data", image_dir, "--preset", "tiny", "--no-lpips", "--no-gan", "--out", out,
                 "--config", cfg, "--quiet", *_sets(SMALL))
        _one_line_error(r, str(cfg), field)
        assert not out.exists(), text


# -- 5. a resume continues with the run's own config -------------------------------------------------------


def test_resume_takes_the_saved_config_and_refuses_changes(s1_run, image_dir, tmp_path):
    run = _copy(s1_run, tmp_path / "run")
    # the interrupted run had logged steps after its checkpoint (step 1): they run again
    with open(run / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 9.0}) + "\n" + json.dumps({"step": 3, "loss": 9.0}) + "\n{\"step\": 4, ")
    r = _cli("--stage", 1, "--data", image_dir, "--resume", run / "last", "--out", run, "--quiet", "--no-lpips",
             "--set", "batch_size=2", "--set", "lr=1e-3", "--set", "max_steps=2")
    _one_line_error(r, "batch_size (1 -> 2)", "lr (", "deterministic may change")
    assert "max_steps (" not in r.output
    # without repeating the original --set: the saved config (batch 1), not the stage's defaults (batch 256)
    r = _cli("--stage", 1, "--data", image_dir, "--resume", run / "last", "--out", run, "--quiet",
             "--set", "max_steps=2", "--set", "log_every=1")
    assert r.exit_code == 0, r.output
    ckpt = read_training_checkpoint(run / "last")
    assert ckpt["step"] == 2 and ckpt["train_config"]["batch_size"] == 1
    assert ckpt["train_config"]["max_steps"] == 2 and ckpt["train_config"]["lpips_weight"] == 0
    steps = [json.loads(line).get("step") for line in (run / "log.jsonl").read_text().splitlines()]
    assert sorted(s for s in steps if s is not None) == [1, 2], steps  # once each, the stale 2, 3 gone
    # repeating the original values is fine (and the same saved no-LPIPS choice)
    r = _cli("--stage", 1, "--data", image_dir, "--resume", run / "last", "--out", run, "--quiet", "--no-lpips",
             "--no-gan", *_sets({**SMALL, "max_steps": 2}))
    assert r.exit_code == 0, r.output


# -- 7. a checkpoint write killed between its two renames ------------------------------------------------


_KILLED_WRITE = """
import os, signal, sys
from pathlib import Path
import rpiae.fileio as fileio
fileio._renameat2 = False  # the two-rename path (file systems without RENAME_EXCHANGE)
real, calls = os.replace, []
def replace(a, b):
    calls.append(a)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # after `last` -> `.last.old`, before the new one moves in
    real(a, b)
os.replace = replace
with fileio.atomic_dir(Path(sys.argv[1]), overwrite=True) as tmp:
    (tmp / "checkpoint.pt").write_bytes(b"new, never finished")
"""


def test_a_killed_replacing_write_leaves_a_resumable_last(s1_run, image_dir, tmp_path):
    from rpiae.fileio import atomic_dir

    run = _copy(s1_run, tmp_path / "run")
    p = subprocess.run([sys.executable, "-c", _KILLED_WRITE, str(run / "last")], cwd=REPO)
    assert p.returncode == -9
    assert not (run / "last").exists() and (run / ".last.old" / "checkpoint.pt").is_file()
    r = _cli("--stage", 1, "--data", image_dir, "--resume", run / "last", "--out", run, "--quiet",
             "--set", "max_steps=2")
    assert r.exit_code == 0, r.output
    assert read_training_checkpoint(run / "last")["step"] == 2 and not (run / ".last.old").exists()
    # atomic_dir's next use recovers too; and with RENAME_EXCHANGE there is no second rename at all
    d = tmp_path / "d"
    with atomic_dir(d) as t:
        (t / "f").write_text("old")
    os.rename(d, tmp_path / ".d.old")
    with pytest.raises(FileExistsError):
        with atomic_dir(d) as t:
            pass
    assert (d / "f").read_text() == "old"


def test_replacing_a_folder_exchanges_it_in_one_step(tmp_path, monkeypatch):
    import rpiae.fileio as fileio

    d = tmp_path / "last"
    with fileio.atomic_dir(d) as t:
        (t / "f").write_text("old")
    probe_a, probe_b = tmp_path / "a", tmp_path / "b"
    probe_a.mkdir(), probe_b.mkdir()
    if not fileio._exchange(probe_a, probe_b):
        pytest.skip("no renameat2 RENAME_EXCHANGE here: the two-rename path (tested above) is used")

    def no_replace(a, b):
        raise AssertionError("a rename that leaves no complete folder for a moment")

    monkeypatch.setattr(fileio.os, "replace", no_replace)
    with fileio.atomic_dir(d, overwrite=True) as t:
        (t / "f").write_text("new")
    assert (d / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "last"]


# -- 8. the logged learning rate is the one the step ran with --------------------------------------------


def test_logged_lr_is_the_rate_of_the_step(tmp_path, photos):
    from rpiae.training.config import load_train_config
    from rpiae.training.trainer import Trainer
    from tests.conftest import make_tiny

    cfg = load_train_config(2, overrides=dict(batch_size=1, epochs=1, warmup_epochs=1.0, lr=1e-3, num_workers=0))
    trainer = Trainer(make_tiny(), cfg, tmp_path / "s2", steps_per_epoch=4)
    x = torch.from_numpy(photos[:1]).clone()
    lrs = [trainer.train_step([x])["lr"] for _ in range(2)]
    assert lrs == pytest.approx([1e-3 * 1 / 4, 1e-3 * 2 / 4])  # linear warm-up from step 0


# -- 6. a spawned child that cannot start ------------------------------------------------------------------


def test_an_unguarded_script_gets_told_to_guard_its_main_code(tmp_path):
    script = tmp_path / "export_script.py"
    script.write_text(textwrap.dedent("""
        import os
        from rpiae.isolation import run_in_child

        print(run_in_child(os.getpid, what="the test step"))
    """))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert p.returncode == 1
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("rpiae.isolation.ChildProcessDied: the test step could not start"), p.stderr
    assert 'if __name__ == "__main__":' in last and "bootstrapping phase" in last and "out of memory" not in last


def test_a_child_that_exits_with_an_error_is_not_called_killed():
    from rpiae.isolation import ChildProcessDied, run_in_child

    with pytest.raises(ChildProcessDied, match=r"^the test step failed: its process exited \(exit code 3\)"):
        run_in_child(os._exit, 3, what="the test step")
