"""train.py's speed against the tools a user would pick instead (TRL, ms-swift, LLaMA-Factory, Unsloth), side by side.

Every row trains the same model folder (bench/workload.py: the Qwen2-VL-2B shape with random weights) on the same
samples (its train.json: 996 formulas rendered from real LaTeX_OCR text) with the same LoRA (r 64, alpha 16,
dropout 0.05 on q/k/v/o/gate/up/down_proj of the language model only), effective batch 16, bf16, the loss on the
answer only, activation checkpointing off, 2 epochs, learning rate 1e-4 decaying linearly, 4 DataLoader workers.
train.py runs with --image_size=500x100; each peer reads those very images, already resized (504 x 112 px, so
every tool makes the same 72 image tokens of them and resizes nothing), written in its own data format. Each peer
runs in its own process as its users run it, with the settings below, its fastest that run on an H200 without
flash-attn and without network. A peer that cannot run is a row that says why (the exception it ended with).
On a GPU a short train.py run goes first, unmeasured: on a freshly started machine the first training process ran
at half speed, whichever it was.

Per peer, what runs, and why these are its fastest settings:
- trl: bench/peer_runs/trl_sft.py, TRL's examples/scripts/sft_vlm.py shape (TrlParser over a YAML of
  ScriptArguments, SFTConfig and ModelConfig; SFTTrainer with peft_config). Data: a datasets.Dataset of images
  (Sequence(Image()) over the paths), prompt (the user turn: image + text) and completion (the assistant turn),
  TRL's prompt-completion format, so the collator masks the prompt. Batch 16 x 1, sdpa, bf16,
  gradient_checkpointing=False (TRL's default is on). No packing or padding-free: TRL refuses both for images.
  No use_liger_kernel: liger-kernel 0.8.5's Qwen2-VL patch imports Qwen2VLCausalLMOutputWithPast, which
  transformers 5.23 no longer has, so it fails at import; TRL's Hub kernels (use_kernels) need the network.
- swift: `python -m swift.cli.main sft swift.yaml`, which is `swift sft swift.yaml`. Data: JSONL of
  {"messages": [user "<image>prompt", assistant latex], "images": [path]}. model DIR with check_model false
  (offline), tuner_type lora, the LoRA above as target_modules (ms-swift's all-linear with freeze_vit and
  freeze_aligner hits the same modules), attn_impl sdpa, batch 16 x 1, gradient_checkpointing false (its default
  is on), use_liger_kernel (PEER_LIGER; its transformers 5.17 still has what Liger patches). Its packing and
  padding_free refuse any attention but flash-attn, so they are off. The step clock goes in through ms-swift's
  documented plugin route (external_plugins, callbacks).
- llamafactory: bench/peer_runs/llamafactory_train.py calls llamafactory.train.tuner.run_exp on the YAML, which
  is what `llamafactory-cli train llamafactory.yaml` does, plus the step clock as a callback. Data: sharegpt JSON
  with "<image>" in the user turn, registered in dataset_info.json. finetuning_type lora, template qwen2_vl,
  freeze_vision_tower and freeze_multi_modal_projector, flash_attn sdpa, enable_liger_kernel (PEER_LIGER),
  disable_gradient_checkpointing (its default is on), batch 16 x 1, lora_dropout set to 0.05 (its default is 0).
  No neat_packing: a packed row holds up to cutoff_len tokens, not one sample, so the effective batch would no
  longer be 16 samples.
- unsloth: bench/peer_runs/unsloth_sft.py, the shape of Unsloth's Qwen2-VL notebooks: FastVisionModel in 16 bit
  (load_in_4bit=False: its 4-bit default is another, slower model), get_peft_model on the language layers only,
  use_gradient_checkpointing=False (its default is its own "unsloth" checkpointing), TRL's SFTTrainer with
  UnslothVisionDataCollator(resize="max": images as they are, not shrunk to 512 px; train_on_responses_only).
  Data: JSONL of {"messages": [...], "images": [path]}, each image opened into its user turn as the notebooks
  do. Dropout stays 0.05 as in every row, though Unsloth's fastest LoRA path wants 0.

Measured per row: samples/s over the steps after the first WARMUP_STEPS (train.py's own steady rate leaves out
its first step only, so its row includes the steps that capture its CUDA graphs; every step counts as 16
samples, as train.py counts them, though each epoch of 996 ends with a step of 4); the wall time from the command
to the adapter file written; peak GPU memory allocated and reserved during training; the logged losses (every
LOGGING_STEPS steps) and the adapter's parameter count (73,859,072 for the 2B shape when the LoRA is the same).
A peer's step times come from bench/peer_runs/step_clock.py, a callback inside its process.

Each peer pins other versions than train.py (bench/peer_wheels.sh lists them): pip install each peer's into its
own folder, PEER_SITES/PEER, which goes first on that peer's PYTHONPATH only, so that train.py and the peer each
import their own versions in one run.

Reads:  ../shared/data/latex_ocr_val_formulas.txt when present (else synthetic formulas)
Writes: bench_results/peers.json (every row, merged with earlier runs' rows), bench_results/peers.md (the table),
        bench_results/peers/NAME/ (each row's configuration, log.txt, clock.json, and the tool's output/)
Run:    python bench/peers.py --peers=trl --peer_sites=/tmp/peers     (a CUDA GPU; docs/peers.md: wheels, commands)
        python bench/peers.py --tiny=true --peers=trl                 (CPU, the tiny model, 3 steps a row)
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from latexocr.config import apply_overrides  # noqa: E402

# -----------------------------------------------------------------------------
TINY = False  # the tiny random model on CPU, 3 steps a row: a smoke run of this script
PEERS = "trl"  # comma-separated, each run after train.py: trl | swift | llamafactory | unsloth
SAMPLES = 996  # training samples (the tutorial's 1000 minus its 4 val)
EPOCHS = 2
MAX_STEPS = 0  # optimizer steps per row; 0 = EPOCHS whole epochs
WARMUP_STEPS = 5  # a peer's first optimizer steps, left out of its steady samples/s (1 at least)
BATCH_SIZE = 16  # samples per optimizer step, every row (one micro-batch of 16 for each peer)
LEARNING_RATE = 1e-4  # every row, decaying linearly to 0, no warm-up
LORA_RANK = 64
LORA_ALPHA = 16
LORA_DROPOUT = 0.05
LORA_TARGET_MODULES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # the language model's only
IMAGE_SIZE = "500x100"  # HxW px for train.py; the peers get its images already so sized (504 x 112, 72 tokens)
MAX_LENGTH = 2048  # tokens per sample, every row (a sample here is ~190)
LOGGING_STEPS = 5  # optimizer steps per logged loss, every row
NUM_WORKERS = 4  # DataLoader worker processes, every row (train.py's default)
PEER_LIGER = True  # the peers' own Liger switches where their versions allow it (ms-swift, LLaMA-Factory); GPU only
PEER_SITES = ""  # folder holding one folder of packages per peer (pip install --target PEER_SITES/PEER); "" = none
FORMULAS_PATH = str(ROOT.parent / "shared" / "data" / "latex_ocr_val_formulas.txt")
RESULTS_DIR = "bench_results"
SHOWN_LOSSES = 4  # logged losses per row in the table (peers.json keeps them all)
# -----------------------------------------------------------------------------
config = apply_overrides(globals())
KNOWN_PEERS = ("trl", "swift", "llamafactory", "unsloth")
peers = [name.strip() for name in PEERS.split(",") if name.strip()]
unknown = [name for name in peers if name not in KNOWN_PEERS]
if unknown:
    raise SystemExit(f"--peers: unknown {', '.join(unknown)}; the peers are {', '.join(KNOWN_PEERS)}")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors import safe_open  # noqa: E402

from bench import workload  # noqa: E402
from latexocr import chat  # noqa: E402
from latexocr.data import read_conversations  # noqa: E402
from latexocr.engine import runtime  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

PEER_RUNS = ROOT / "bench" / "peer_runs"
TARGET_MODULES = [name.strip() for name in LORA_TARGET_MODULES.split(",") if name.strip()]


def run_row(name: str, command: list[str], row_dir: Path, site: str = "") -> dict:
    """Run one row's command in row_dir (the tool writes into row_dir/output), its output shown and kept in
    row_dir/log.txt, with `site` first on its PYTHONPATH; return the wall time from the command to the adapter
    saved, or why it failed."""
    env = dict(os.environ, PEER_CLOCK_JSON=str(row_dir / "clock.json"))
    if site:
        env["PYTHONPATH"] = os.pathsep.join(path for path in (site, os.environ.get("PYTHONPATH")) if path)
    print(f"--- {name}: {' '.join(command)}" + (f" (PYTHONPATH starts with {site})" if site else ""), flush=True)
    started = time.time()
    with open(row_dir / "log.txt", "wb") as log:
        process = subprocess.Popen(command, cwd=row_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for chunk in iter(lambda: process.stdout.read1(1 << 16), b""):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            log.write(chunk)
        status = process.wait()
    adapters = sorted(row_dir.rglob("adapter_model.safetensors"), key=lambda path: path.stat().st_mtime)
    if status or not adapters:
        return dict(failed=failure((row_dir / "log.txt").read_text(errors="replace"), status), command=command)
    return dict(wall_to_adapter_s=adapters[-1].stat().st_mtime - started, started_wall=started,
                adapter_parameters=adapter_parameters(adapters[-1]), command=command)


def failure(log: str, status: int) -> str:
    """The exception a failed run ended with (the last line naming one), else its last line of output."""
    lines = [line.strip() for line in re.split(r"[\r\n]+", log) if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", line)]
    last = (errors or lines or ["no output"])[-1]
    return f"exit status {status}: {last[:400]}" if status else f"no adapter saved: {last[:400]}"


def adapter_parameters(path: Path) -> int:
    with safe_open(path, "pt") as weights:
        return sum(torch.Size(weights.get_slice(key).get_shape()).numel() for key in weights.keys())


def peer_row(name: str, command: list[str], row_dir: Path) -> dict:
    """Run a peer and read what its step clock wrote: the steady rate, the memory, the losses, the versions."""
    site = str(Path(PEER_SITES) / name) if PEER_SITES else ""
    if site and not Path(site).is_dir():
        return dict(failed=f"{site} does not exist: install the peer's wheels there (bench/peer_wheels.sh {name})")
    row = run_row(name, command, row_dir, site)
    clock_path = row_dir / "clock.json"
    if "failed" in row:
        return row
    if not clock_path.is_file():
        return dict(row, failed="the step clock wrote nothing: the callback did not reach the peer's Trainer")
    clock = json.loads(clock_path.read_text())
    ends = clock["step_ends_s"]
    if len(ends) < 2:
        return dict(row, failed=f"{len(ends)} optimizer steps ran: a steady rate needs 2 or more")
    warmup = min(max(WARMUP_STEPS, 1), len(ends) - 1)  # the steady steps start at the end of the warm-up's last
    return dict(row, steps=len(ends), steady_steps=len(ends) - warmup,
                samples_per_s=(len(ends) - warmup) * clock["batch_size"] / (ends[-1] - ends[warmup - 1]),
                startup_s=clock["train_begin_wall"] - row["started_wall"],
                training_s=clock["train_end_wall"] - clock["train_begin_wall"],
                peak_allocated_gib=clock["peak_allocated_gib"], peak_reserved_gib=clock["peak_reserved_gib"],
                losses=clock["losses"], gradient_checkpointing=clock["gradient_checkpointing"],
                versions=clock["versions"])


def write_yaml(path: Path, settings: dict) -> Path:
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    return path


def schedule() -> dict:
    """The optimizer schedule every Trainer-based peer is given, in transformers' TrainingArguments names."""
    return dict(per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=1, learning_rate=LEARNING_RATE,
                lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, num_train_epochs=EPOCHS,
                max_steps=MAX_STEPS or -1, logging_steps=LOGGING_STEPS, save_strategy="no", seed=42,
                dataloader_num_workers=NUM_WORKERS, report_to="none", **precision())


def precision() -> dict:
    return dict(bf16=True) if on_gpu else dict(bf16=False, use_cpu=True)


def train_py_command(row_dir: Path, max_steps: int) -> list[str]:
    return [sys.executable, str(ROOT / "train.py"), f"--model_id={model_dir}", f"--train_json_path={train_json}",
            "--val_json_path=", f"--output_dir={row_dir / 'output'}", f"--image_size={IMAGE_SIZE}",
            f"--lora_rank={LORA_RANK}", f"--lora_alpha={LORA_ALPHA}", f"--lora_dropout={LORA_DROPOUT}",
            f"--lora_target_modules={LORA_TARGET_MODULES}", f"--batch_size={BATCH_SIZE}",
            f"--learning_rate={LEARNING_RATE}", f"--num_train_epochs={EPOCHS}", f"--max_steps={max_steps or -1}",
            f"--max_length={MAX_LENGTH}", f"--logging_steps={LOGGING_STEPS}", f"--num_workers={NUM_WORKERS}",
            "--save_steps=1000000", "--resume=false", "--swanlab_mode=disabled", *([] if on_gpu else ["--device=cpu"])]


def trl_command(row_dir: Path) -> list[str]:
    settings = dict(dataset_name=str(peer_data / "trl"), model_name_or_path=str(model_dir),
                    dtype="bfloat16" if on_gpu else "float32", attn_implementation="sdpa", use_peft=True,
                    lora_r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                    lora_target_modules=TARGET_MODULES, output_dir=str(row_dir / "output"),
                    gradient_checkpointing=False, max_length=MAX_LENGTH, **schedule())
    return [sys.executable, str(PEER_RUNS / "trl_sft.py"), "--config",
            str(write_yaml(row_dir / "trl.yaml", settings))]


def swift_command(row_dir: Path) -> list[str]:
    settings = dict(model=str(model_dir), model_type="qwen2_vl", template="qwen2_vl", check_model=False,
                    dataset=[str(peer_data / "swift" / "train.jsonl")], split_dataset_ratio=0.0,
                    tuner_type="lora", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                    target_modules=TARGET_MODULES, freeze_vit=True, freeze_aligner=True,
                    torch_dtype="bfloat16" if on_gpu else "float32", attn_impl="sdpa", max_length=MAX_LENGTH,
                    gradient_checkpointing=False, output_dir=str(row_dir / "output"), add_version=False,
                    use_liger_kernel=PEER_LIGER and on_gpu, external_plugins=[str(PEER_RUNS / "swift_plugin.py")],
                    callbacks=["step_clock"],
                    # ms-swift writes the adapter as a checkpoint only: once, after the last step, without the
                    # optimizer's state
                    **dict(schedule(), save_strategy="steps", save_steps=10**6, save_only_model=True))
    return [sys.executable, "-m", "swift.cli.main", "sft", str(write_yaml(row_dir / "swift.yaml", settings))]


def llamafactory_command(row_dir: Path) -> list[str]:
    settings = dict(model_name_or_path=str(model_dir), trust_remote_code=False, stage="sft", do_train=True,
                    finetuning_type="lora", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT,
                    lora_target=",".join(TARGET_MODULES), freeze_vision_tower=True, freeze_multi_modal_projector=True,
                    dataset="latex_ocr", dataset_dir=str(peer_data / "llamafactory"), template="qwen2_vl",
                    cutoff_len=MAX_LENGTH, overwrite_cache=True, preprocessing_num_workers=NUM_WORKERS or None,
                    flash_attn="sdpa", enable_liger_kernel=PEER_LIGER and on_gpu, disable_gradient_checkpointing=True,
                    output_dir=str(row_dir / "output"), overwrite_output_dir=True, plot_loss=False, **schedule())
    return [sys.executable, str(PEER_RUNS / "llamafactory_train.py"),
            str(write_yaml(row_dir / "llamafactory.yaml", settings))]


def unsloth_command(row_dir: Path) -> list[str]:
    settings = dict(dataset_name=str(peer_data / "unsloth"), model_name_or_path=str(model_dir),
                    dtype="bfloat16" if on_gpu else "float32", use_peft=True, lora_r=LORA_RANK,
                    lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, lora_target_modules=TARGET_MODULES,
                    output_dir=str(row_dir / "output"), gradient_checkpointing=False, max_length=MAX_LENGTH,
                    **schedule())
    return [sys.executable, str(PEER_RUNS / "unsloth_sft.py"), "--config",
            str(write_yaml(row_dir / "unsloth.yaml", settings))]


COMMANDS = dict(trl=trl_command, swift=swift_command, llamafactory=llamafactory_command, unsloth=unsloth_command)

# --- setup -------------------------------------------------------------------
results_dir = (ROOT / RESULTS_DIR).resolve()
results_dir.mkdir(parents=True, exist_ok=True)
on_gpu = torch.cuda.is_available() and not TINY
if not on_gpu and not TINY:
    raise SystemExit("No CUDA GPU: run on a GPU, or use --tiny=true for a CPU smoke run of this script.")
if TINY:
    SAMPLES, MAX_STEPS, WARMUP_STEPS, LOGGING_STEPS, NUM_WORKERS = 48, 3, 1, 1, 0
results_path = results_dir / "peers.json"
results = json.loads(results_path.read_text()) if results_path.is_file() else {}
results["environment"] = dict(**workload.machine(on_gpu), samples=SAMPLES, train_py_versions=runtime.versions())
rows = results.setdefault("rows", {})

# --- model and data ----------------------------------------------------------
model_dir = workload.model_folder(results_dir, TINY)
train_json = workload.train_json(results_dir, SAMPLES, FORMULAS_PATH)
samples = read_conversations(train_json)
print(f"data: {len(samples)} samples in {train_json}")
# The peers' copy of train.py's images, sized as train.py sizes them, so that no tool resizes them again.
peer_data = results_dir / "peer_data"
sizing = chat.sizing(image_size=IMAGE_SIZE)
image_dir = peer_data / "images"
image_dir.mkdir(parents=True, exist_ok=True)
images = [image_dir / f"{sample.id}.png" for sample in samples]
for sample, path in zip(samples, images):
    if not path.is_file():
        chat.load_image(sample.image, sizing).save(path)
processor = AutoProcessor.from_pretrained(model_dir)
grid = processor.image_processor(images=[chat.load_image(images[0], sizing)], return_tensors="pt")["image_grid_thw"]
results["environment"]["image_tokens_per_sample"] = int(grid.prod()) // 4  # 2 x 2 patches merge into one token
results["environment"]["image_px"] = "x".join(map(str, chat.load_image(images[0], sizing).size))  # width x height
pairs = list(zip(samples, images))
user_turn = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": chat.PROMPT}]}


def assistant_turn(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def tagged_turns(text: str) -> list[dict]:
    """ms-swift's and LLaMA-Factory's messages: the image as an <image> tag in the text, the files beside."""
    return [{"role": "user", "content": "<image>" + chat.PROMPT}, {"role": "assistant", "content": text}]


formats = {
    # TRL: prompt-completion, the loss on the completion; Unsloth: one conversation, the loss after its response part
    "trl/train.jsonl": [dict(images=[str(path)], prompt=[user_turn], completion=[assistant_turn(sample.text)])
                        for sample, path in pairs],
    "unsloth/train.jsonl": [dict(images=[str(path)], messages=[user_turn, assistant_turn(sample.text)])
                            for sample, path in pairs],
    "swift/train.jsonl": [dict(messages=tagged_turns(sample.text), images=[str(path)]) for sample, path in pairs],
}
for name, records in formats.items():
    (peer_data / name).parent.mkdir(parents=True, exist_ok=True)
    (peer_data / name).write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
(peer_data / "llamafactory").mkdir(exist_ok=True)
(peer_data / "llamafactory" / "latex_ocr.json").write_text(json.dumps(
    [dict(messages=tagged_turns(sample.text), images=[str(path)]) for sample, path in pairs], ensure_ascii=False,
    indent=1))
(peer_data / "llamafactory" / "dataset_info.json").write_text(json.dumps(dict(latex_ocr=dict(
    file_name="latex_ocr.json", formatting="sharegpt", columns=dict(messages="messages", images="images"),
    tags=dict(role_tag="role", content_tag="content", user_tag="user", assistant_tag="assistant"))), indent=1))

# --- work ----------------------------------------------------------------------
rows_dir = results_dir / "peers"
if on_gpu:  # the first training process on a freshly started machine ran at half speed: warm up, unmeasured
    shutil.rmtree(rows_dir / "warmup", ignore_errors=True)
    (rows_dir / "warmup").mkdir(parents=True)
    run_row("warm-up", train_py_command(rows_dir / "warmup", 5), rows_dir / "warmup")
for name in ["train.py", *peers]:
    row_dir = rows_dir / name
    shutil.rmtree(row_dir, ignore_errors=True)
    row_dir.mkdir(parents=True)
    if name == "train.py":
        row = run_row(name, train_py_command(row_dir, MAX_STEPS), row_dir)
        if "failed" not in row:
            trained = json.loads((row_dir / "output" / "train_results.json").read_text())
            row.update(steps=trained["steps"], samples_per_s=trained["steady_samples_per_s"],
                       replayed_samples_per_s=trained["replayed_samples_per_s"],
                       peak_allocated_gib=trained["peak_allocated_gib"], peak_reserved_gib=trained["peak_reserved_gib"],
                       losses=[point["loss"] for point in trained["curve"]], gradient_checkpointing=trained["activation_checkpointing"],
                       micro_batch_size=trained["micro_batch_size"], cuda_graphs=trained["cuda_graphs"],
                       versions=json.loads((row_dir / "output" / "train_config.json").read_text())["versions"])
    else:
        row = peer_row(name, COMMANDS[name](row_dir), row_dir)
        ours = rows.get("train.py", {})
        if "samples_per_s" in ours:  # train.py of this same run, for the ratio
            row["train_py_samples_per_s"] = ours["samples_per_s"]
    row.update(date=results["environment"]["date"], device=results["environment"]["device"], tiny=TINY)
    rows[name] = row
    results_path.write_text(json.dumps(results, indent=1) + "\n")

# --- summary -----------------------------------------------------------------
env = results["environment"]
lines = [f"{env['samples']} samples of {env['image_px']} px ({env['image_tokens_per_sample']} image tokens), "
         f"effective batch {BATCH_SIZE}, LoRA r {LORA_RANK} alpha {LORA_ALPHA} on {', '.join(TARGET_MODULES)}; "
         f"samples/s leave out a peer's first {WARMUP_STEPS} steps, train.py's first step", "",
         "| row | run | versions | samples/s | vs train.py, same run | command to adapter s | "
         "peak alloc / reserved GiB | first losses | adapter parameters |", "|---|---|---|---|---|---|---|---|---|"]
for name, row in rows.items():
    run = f"{row.get('device', '')}, {row.get('date', '')}"
    if "failed" in row:
        lines.append(f"| {name} | {run} | | failed: {row['failed'].replace('|', '/')} ||||||")
        continue
    versions = ", ".join(f"{package} {number}" for package, number in row["versions"].items()
                         if package in ("torch", "transformers", "peft", "trl", "ms-swift", "llamafactory", "unsloth"))
    ratio = f"{row['samples_per_s'] / row['train_py_samples_per_s']:.2f}x" if "train_py_samples_per_s" in row else ""
    losses = ", ".join(f"{loss:.3f}" for loss in row["losses"][:SHOWN_LOSSES])
    lines.append(f"| {name} | {run} | {versions} | {row['samples_per_s']:.1f} | {ratio} | "
                 f"{row['wall_to_adapter_s']:.0f} | {row['peak_allocated_gib']:.1f} / {row['peak_reserved_gib']:.1f} | "
                 f"{losses} | {row['adapter_parameters']:,} |")
table = "\n".join(lines)
(results_dir / "peers.md").write_text(table + "\n")
print(table)
print(f"done: {results_path}, {results_dir / 'peers.md'}")
