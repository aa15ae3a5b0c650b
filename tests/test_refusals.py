"""Settings that cannot work are refused before anything loads, with a message naming the value and what to do; the
checks are called in process, as train.py calls them."""

import json

import pytest

from latexocr import settings, tracking
from latexocr.config import apply_overrides
from latexocr.engine import checkpoints, runtime
from latexocr.engine.distributed import Processes


def train_config(**changes) -> dict:
    """train.py's settings as apply_overrides resolves them, with `changes` given on the command line."""
    namespace = {"MODEL_ID": "tiny-random", "DEVICE": "cpu", "BATCH_SIZE": 16, "MICRO_BATCH_SIZE": 0,
                 "MAX_TOKENS_PER_FORWARD": 0, "DISTRIBUTED": "ddp", "OUTPUT_DIR": "out"}
    return apply_overrides(namespace, [f"--{k}={v}" for k, v in changes.items()],
                           rules={k: v for k, v in settings.TRAIN.items() if k.upper() in namespace})


@pytest.mark.parametrize("arg, message", [
    ("--batch_size=0", "--batch_size=0: must be more than 0"),
    ("--learning_rate=2", "--learning_rate=2.0: must be more than 0 and below 1"),
    ("--lora_dropout=1", "--lora_dropout=1.0: must be at least 0 and below 1"),
    ("--max_steps=0", "--max_steps=0: must be more than 0, or -1 for no limit"),
    ("--distributed=deepspeed", "--distributed=deepspeed: expected ddp, zero2, zero3 or fsdp"),
    ("--image_size=100", "--image_size=100: expected HEIGHTxWIDTH in px"),
    ("--lora_target_modules=,", "expected comma-separated module names"),
    ("--cuda_graphs=sometimes", "--cuda_graphs=sometimes: expected auto, true or false"),
])
def test_a_setting_out_of_range_names_the_value_and_the_range(arg, message):
    namespace = {"BATCH_SIZE": 16, "LEARNING_RATE": 1e-4, "LORA_DROPOUT": 0.05, "MAX_STEPS": -1,
                 "DISTRIBUTED": "ddp", "IMAGE_SIZE": "", "LORA_TARGET_MODULES": "q_proj", "CUDA_GRAPHS": "auto"}
    rules = {k.lower(): settings.TRAIN[k.lower()] for k in namespace}
    with pytest.raises(SystemExit, match=message):
        apply_overrides(namespace, [arg], rules=rules)


def test_enumerations_accept_another_case_and_keep_the_lower_case():
    assert train_config(distributed="ZeRO2")["distributed"] == "zero2"


def test_an_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(SystemExit, match="is a file, not a folder"):
        train_config(output_dir=tmp_path / "taken")


def test_settings_that_do_not_fit_the_processes_are_refused():
    with pytest.raises(SystemExit, match=r"does not split evenly over 3 processes.*--batch_size=15"):
        runtime.check_setup(train_config(), Processes(world_size=3))
    with pytest.raises(SystemExit, match="--micro_batch_size=3 must divide"):
        runtime.check_setup(train_config(micro_batch_size=3), Processes())
    with pytest.raises(SystemExit, match="Use one of the two"):
        runtime.check_setup(train_config(micro_batch_size=4, max_tokens_per_forward=1000), Processes())
    with pytest.raises(SystemExit, match="--distributed=fsdp needs CUDA GPUs"):
        runtime.check_setup(train_config(distributed="fsdp"), Processes())


def test_deepspeed_settings_say_how_to_install_it_when_it_is_missing(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"pip install deepspeed==0.19.8"):
        runtime.check_setup(train_config(distributed="zero3"), Processes())


def test_no_gpu_says_how_to_run_on_a_cpu(monkeypatch):
    monkeypatch.setattr("latexocr.modeling.default_device", lambda: "cpu")
    with pytest.raises(SystemExit, match="--model_id=tiny-random --max_steps=20"):
        runtime.check_setup(train_config(model_id="Qwen/Qwen2-VL-2B-Instruct", device="auto"), Processes())


def test_cloud_tracking_without_a_login_logs_locally_and_says_so(monkeypatch, tmp_path):
    monkeypatch.delenv("SWANLAB_API_KEY", raising=False)
    monkeypatch.setenv("SWANLAB_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    mode, message = tracking.resolve_mode("cloud")
    assert mode == "local" and "no login found" in message
    monkeypatch.setenv("SWANLAB_API_KEY", "from-the-environment")
    assert tracking.resolve_mode("cloud")[0] == tracking.resolve_mode("auto")[0] == "cloud"
    assert tracking.resolve_mode("disabled") == ("disabled", "")


RUN = dict(model_id="tiny-random", train_data_sha256="abc", prompt="p", min_pixels=1, max_pixels=2, image_size="",
           tuner="lora", train_vision="none", lora_rank=64, lora_alpha=16, lora_dropout=0.05, lora_target_modules="q",
           batch_size=4, learning_rate=1e-3, lr_scheduler_type="constant", seed=42, distributed="ddp", max_steps=6,
           num_train_epochs=2)


def checkpointed(folder, step: int, max_steps: int, config: dict, whole_state: bool = True):
    """A folder as train.py leaves it: its config, and checkpoint-<step> of a run planned for max_steps."""
    folder.mkdir(exist_ok=True)
    (folder / "train_config.json").write_text(json.dumps(config))
    checkpoint = folder / f"checkpoint-{step}"
    checkpoint.mkdir()
    (checkpoint / "adapter_model.safetensors").write_bytes(b"weights")
    (checkpoint / "optimizer.pt").write_bytes(b"state")
    state = json.dumps({"global_step": step, "max_steps": max_steps})
    (checkpoint / "trainer_state.json").write_text(state if whole_state else state[:10])


def test_resume_takes_the_newest_whole_checkpoint_and_knows_when_the_run_is_done(tmp_path):
    assert checkpoints.decide(tmp_path, RUN, "adapter_model.safetensors", resume=True).checkpoint is None
    checkpointed(tmp_path, 4, 6, RUN)
    checkpointed(tmp_path, 6, 6, RUN, whole_state=False)  # killed while writing its state
    resume = checkpoints.decide(tmp_path, RUN, "adapter_model.safetensors", resume=True)
    assert resume.checkpoint.name == "checkpoint-4" and not resume.finished
    assert checkpoints.decide(tmp_path, RUN, "adapter_model.safetensors", resume=False).checkpoint is None
    done = tmp_path / "done"
    checkpointed(done, 6, 6, RUN)
    assert checkpoints.decide(done, RUN, "adapter_model.safetensors", resume=True).finished


def test_resume_refuses_other_settings_other_data_and_a_schedule_stretched(tmp_path):
    checkpointed(tmp_path, 2, 6, RUN)
    with pytest.raises(SystemExit, match=r"lora_rank: 64 -> 8.*--resume=false"):
        checkpoints.decide(tmp_path, dict(RUN, lora_rank=8), "adapter_model.safetensors", resume=True)
    with pytest.raises(SystemExit, match=r"train_data_sha256: 'abc' -> 'def'"):  # same file name, other rows
        checkpoints.decide(tmp_path, dict(RUN, train_data_sha256="def"), "adapter_model.safetensors", resume=True)
    linear = tmp_path / "linear"
    checkpointed(linear, 6, 6, dict(RUN, lr_scheduler_type="linear"))
    with pytest.raises(SystemExit, match="a rate that decayed to 0 would jump back up"):
        checkpoints.decide(linear, dict(RUN, lr_scheduler_type="linear", max_steps=12), "adapter_model.safetensors",
                           resume=True)
    extended = checkpoints.decide(tmp_path, dict(RUN, max_steps=12), "adapter_model.safetensors", resume=True)
    assert extended.checkpoint.name == "checkpoint-2" and extended.planned_steps == 12  # constant: may be extended
    (tmp_path / "train_config.json").write_text('{"model_id": "tiny')  # cut short
    with pytest.raises(SystemExit, match="no readable train_config.json"):
        checkpoints.decide(tmp_path, RUN, "adapter_model.safetensors", resume=True)
