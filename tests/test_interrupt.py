"""A script killed outright (SIGKILL: the out-of-memory killer, a lost job slot) mid-run continues when the
same command is run again, and ends exactly where an uninterrupted run ends."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # runs the scripts as a user does

POLL_DEADLINE_S = 600  # how long to wait for the moment to kill: generous, a busy machine can be slow
ROWS = 120  # data2csv.py rows: enough that the kill lands well inside the loop
STEPS = 10  # train.py optimizer steps; the run is killed as soon as checkpoint-4 holds CHECKPOINT_FILES
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "trainer_state.json")  # the state comes last
# The defaults otherwise: DataLoader workers, dropout on, a linear learning rate. 27 samples in batches of 4 are 7
# steps an epoch, so the resumed run finishes the epoch it was killed in and starts another.
TRAIN = ["--model_id=tiny-random", "--batch_size=4", "--save_steps=2", "--logging_steps=1",
         "--swanlab_mode=disabled", "--val_json_path=", "--learning_rate=1e-3", f"--max_steps={STEPS}"]


def kill_when(ready, script: str, *args: str, cwd: Path, log: Path) -> None:
    """Run a script as a user would and SIGKILL it as soon as ready() is true; fail if it ends first."""
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stall the script
        process = subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd, stdout=out,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + POLL_DEADLINE_S
    try:
        while not ready():
            if process.poll() is not None:
                pytest.fail(f"{script} ended (exit {process.returncode}) before the moment to kill it:\n"
                            f"{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"{script}: the moment to kill it did not come within {POLL_DEADLINE_S} s")
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, f"{script} finished before the kill landed"


def saved_images(folder: Path) -> dict[str, os.stat_result]:
    """The finished images (<row>.png), not the temporary files an image is written through."""
    return {p.name: p.stat() for p in folder.glob("*.png") if re.fullmatch(r"\d+\.png", p.name)}


def test_data2csv_killed_midway_resumes_without_redoing_saved_images(tmp_path):
    args = ("--source=synthetic", f"--max_data_number={ROWS}")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()
    run_script("data2csv.py", *args, cwd=straight)

    kill_when(lambda: len(saved_images(killed / "LaTeX_OCR")) >= ROWS // 2, "data2csv.py", *args, cwd=killed,
              log=tmp_path / "killed.log")
    before = {name: (s.st_ino, s.st_mtime_ns) for name, s in saved_images(killed / "LaTeX_OCR").items()}
    assert ROWS // 2 <= len(before) < ROWS and not (killed / "latex_ocr_train.csv").exists()  # killed mid-loop
    # The kill may or may not have landed inside image.save(); make sure the temporary file that leaves is there.
    half = (straight / "LaTeX_OCR" / f"{ROWS - 1}.png").read_bytes()
    (killed / "LaTeX_OCR" / f".{ROWS - 1}.png.killed__.png").write_bytes(half[:len(half) // 2])

    result = run_script("data2csv.py", *args, cwd=killed)

    assert f"({ROWS - len(before)} new, {len(before)} already there)" in result.stdout
    assert re.search(r"removed \d+ temporary file\(s\) left by an interrupted run", result.stdout)
    after = saved_images(killed / "LaTeX_OCR")
    assert {name: (after[name].st_ino, after[name].st_mtime_ns) for name in before} == before  # not rewritten
    for folder in (Path(), Path("LaTeX_OCR")):  # the same files, byte for byte, and no temporary ones
        names = sorted(p.name for p in (killed / folder).iterdir())
        assert names == sorted(p.name for p in (straight / folder).iterdir())
        for name in names:
            if (straight / folder / name).is_file():
                assert (killed / folder / name).read_bytes() == (straight / folder / name).read_bytes(), name


def test_train_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path):
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=30", cwd=tmp_path)
    run_script("csv2json.py", cwd=tmp_path)
    run_script("train.py", *TRAIN, "--output_dir=straight", cwd=tmp_path)

    killed = tmp_path / "killed"
    kill_when(lambda: all((killed / "checkpoint-4" / name).is_file() for name in CHECKPOINT_FILES), "train.py",
              *TRAIN, "--output_dir=killed", cwd=tmp_path, log=tmp_path / "killed.log")
    assert not (killed / "adapter_model.safetensors").exists() and not (killed / f"checkpoint-{STEPS}").exists()
    # The kill can land while the Trainer writes trainer_state.json (last, in place); then checkpoint-2 is the
    # newest whole one. A kill there one checkpoint later leaves this:
    try:
        json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())
        newest = 4
    except ValueError:
        newest = 2
    shutil.copytree(killed / f"checkpoint-{newest}", killed / "checkpoint-6", dirs_exist_ok=True)
    state = (killed / f"checkpoint-{newest}" / "trainer_state.json").read_text()
    (killed / "checkpoint-6" / "trainer_state.json").write_text(state[:len(state) // 2])

    resumed = run_script("train.py", *TRAIN, "--output_dir=killed", cwd=tmp_path)  # the same command again

    assert f"resuming from killed/checkpoint-{newest} (step {newest})" in resumed.stdout
    results = [json.loads((tmp_path / name / "train_results.json").read_text()) for name in ("straight", "killed")]
    assert [(r["steps"], r["steps_this_run"]) for r in results] == [(STEPS, STEPS), (STEPS, STEPS - newest)]
    # The same loss at every step, and the same adapter, bit for bit (as two uninterrupted runs are): optimizer,
    # schedule, random state and data order were all restored.
    losses = [[(e["step"], e["loss"]) for e in json.loads((tmp_path / name / f"checkpoint-{STEPS}" /
                                                           "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for name in ("straight", "killed")]
    assert [step for step, _ in losses[0]] == list(range(1, STEPS + 1))
    assert [step for step, _ in losses[1]] == [step for step, _ in losses[0]]
    assert [loss for _, loss in losses[1]] == [loss for _, loss in losses[0]]
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())
    assert any(a[name].abs().sum() > 0 for name in a if "lora_B" in name)  # training moved the adapter
