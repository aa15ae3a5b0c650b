"""Data-parallel training: two processes (gloo, on CPU) train exactly like one process with the same global batch,
and only rank 0 prints and writes. Started with torchrun and accelerate launch, as a user would."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # runs the scripts as a user does

# No dropout (its random masks would differ between runs) and a large constant learning rate, so that four steps
# move the adapter well past the tolerances below. The global batch is 4 samples in every run.
COMMON = ["--device=cpu", "--model_id=tiny-random", "--batch_size=4", "--max_steps=4", "--logging_steps=1",
          "--save_steps=2", "--swanlab_mode=disabled", "--num_workers=0", "--val_json_path=", "--lora_dropout=0",
          "--learning_rate=1e-3", "--lr_scheduler_type=constant"]
# The runs differ only in the order of fp32 sums (batch shapes, the all-reduce): about 1e-7 of the loss was seen.
# Normalising each process's loss by its own answer tokens instead of the step's (average_tokens_across_devices
# off) moved the losses by 3e-4 to 8e-4 of their value and the gradient norms by up to 1%.
LOSS_RTOL = 1e-5
ADAPTER_ATOL = 2e-5  # 2% of one Adam step at lr 1e-3; the adapter moved by about 4e-3 (2e-6 difference was seen)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(launcher: list[str], *args: str, cwd) -> subprocess.Popen:
    """train.py under a launcher (`python -m torch.distributed.run ...`), in the background."""
    return subprocess.Popen([sys.executable, "-m", *launcher, str(ROOT / "train.py"), *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, OMP_NUM_THREADS="1"))


def finish(process: subprocess.Popen, check: bool = True) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=600)
    if check and process.returncode != 0:
        pytest.fail(f"{' '.join(process.args)} exited {process.returncode}\n"
                    f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}")
    return stdout, stderr


def losses(output_dir) -> list[tuple[int, float, float]]:
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    return [(h["step"], h["loss"], h["grad_norm"]) for h in state["log_history"] if "loss" in h]


def assert_same_training(output_dir, reference_dir):
    got, expected = losses(output_dir), losses(reference_dir)
    assert [step for step, _, _ in got] == [1, 2, 3, 4]
    for (step, loss, grad_norm), (_, ref_loss, ref_grad_norm) in zip(got, expected):
        assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL), (step, got, expected)
        assert grad_norm == pytest.approx(ref_grad_norm, rel=LOSS_RTOL), (step, got, expected)
    assert expected[-1][1] < expected[0][1] - 0.05  # the loss went down: the steps did something
    a = load_file(output_dir / "adapter_model.safetensors")
    b = load_file(reference_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=ADAPTER_ATOL, rtol=0), name
    assert max(b[name].abs().max().item() for name in b if "lora_B" in name) > 100 * ADAPTER_ATOL


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """Data, and the single-process run every distributed run is held against."""
    folder = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OMP_NUM_THREADS", "1")  # the launchers do this per process; the same here keeps numbers alike
        run_script("data2csv.py", "--source=synthetic", "--max_data_number=40", cwd=folder)
        run_script("csv2json.py", cwd=folder)
        run_script("train.py", *COMMON, "--output_dir=one", cwd=folder)
    return folder


def test_torchrun_two_processes_train_like_one(workdir):
    # Micro-batches of 1 with accumulation 2 on each of 2 processes, against 4 at once on one process.
    process = start(["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"],
                    *COMMON, "--micro_batch_size=1", "--output_dir=torchrun", cwd=workdir)
    stdout, _ = finish(process)
    assert_same_training(workdir / "torchrun", workdir / "one")
    plan = json.loads((workdir / "torchrun" / "train_results.json").read_text())
    assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"], plan["processes"]) == (1, 2, 2)
    for line in ("data: 36 training samples", "model: tiny-random", "step 4/4 | loss", "saved: adapter", "done:"):
        assert stdout.count(line) == 1, (line, stdout)  # printed by rank 0 alone
    assert sorted(p.name for p in (workdir / "torchrun" / "checkpoint-4").glob("rng_state_*")) == \
        ["rng_state_0.pth", "rng_state_1.pth"]  # each process's random state, for resuming


def test_accelerate_launch_two_processes_train_like_one(workdir):
    # --multi_gpu is accelerate's switch for one process per device, here CPU processes (--device=cpu, gloo);
    # --cpu alone would start a single process.
    process = start(["accelerate.commands.launch", "--multi_gpu", "--num_processes=2", "--num_machines=1",
                     "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}"],
                    *COMMON, "--output_dir=accelerate", cwd=workdir)
    stdout, _ = finish(process)
    assert_same_training(workdir / "accelerate", workdir / "one")
    plan = json.loads((workdir / "accelerate" / "train_results.json").read_text())
    assert (plan["micro_batch_size"], plan["gradient_accumulation_steps"], plan["processes"]) == (2, 1, 2)
    assert stdout.count("step 4/4 | loss") == 1


@pytest.mark.parametrize("distributed", ["zero2", "zero3"])
def test_deepspeed_trains_like_one_process(workdir, distributed):
    """DeepSpeed is optional (not in requirements.txt); on a CPU it runs with its own CPU backend over gloo."""
    pytest.importorskip("deepspeed")
    process = start(["torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"],
                    *COMMON, "--micro_batch_size=1", f"--distributed={distributed}", f"--output_dir={distributed}",
                    cwd=workdir)
    stdout, _ = finish(process)
    assert_same_training(workdir / distributed, workdir / "one")  # zero3 gathers the sharded adapter to save it
    assert (workdir / distributed / "checkpoint-4" / "latest").is_file()  # what resuming looks for
    assert stdout.count("step 4/4 | loss") == 1


def test_two_machines_only_rank_0_writes(workdir, tmp_path):
    """Two 'machines' (a torchrun per node, each in its own folder with its own copy of the data): the second
    prints nothing and writes nothing but the random state the Trainer keeps per process."""
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for folder in machines:
        folder.mkdir()
        shutil.copytree(workdir / "LaTeX_OCR", folder / "LaTeX_OCR")
        shutil.copy(workdir / "latex_ocr_train.json", folder)
    port = free_port()
    launch = [["torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
               "--master_addr=127.0.0.1", f"--master_port={port}"] for node in (0, 1)]
    nodes = [start(launch[node], *COMMON, "--output_dir=out", cwd=machines[node]) for node in (0, 1)]
    (stdout0, _), (stdout1, _) = finish(nodes[0]), finish(nodes[1])
    assert_same_training(machines[0] / "out", workdir / "one")
    assert "step 4/4 | loss" in stdout0 and "done:" in stdout0
    assert stdout1 == ""
    written = sorted(str(p.relative_to(machines[1] / "out")) for p in (machines[1] / "out").rglob("*") if p.is_file())
    assert written == ["checkpoint-2/rng_state_1.pth", "checkpoint-4/rng_state_1.pth"], written
    assert sorted(p.name for p in machines[1].iterdir()) == ["LaTeX_OCR", "latex_ocr_train.json", "out"]

    # Resuming needs every process to find the same checkpoint: here the second machine has none.
    nodes = [start(launch[node], *COMMON, "--max_steps=6", "--output_dir=out", cwd=machines[node]) for node in (0, 1)]
    (_, stderr0), _ = finish(nodes[0], check=False), finish(nodes[1], check=False)
    assert nodes[0].returncode != 0 and "OUTPUT_DIR must be a folder they all share" in stderr0
