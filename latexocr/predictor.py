"""A trained run loaded for prediction, as infer.py, app.py and train.py's evaluation all predict.

Everything comes from what training wrote: the base model, the prompt and the image sizing from
OUTPUT_DIR/train_config.json; the weights from the adapter (LoRA), or from OUTPUT_DIR itself when it holds a whole
model (export.py's merged folder, or a --tuner=full run). Nothing is declared twice.
"""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from latexocr import chat, modeling
from latexocr.data import (SOURCE_RECORD, Sample, atomic_write_text, image_problem, make_readable, staging_folder,
                           read_conversations)

EXPORT_RECORD = "export.json"  # what export.py writes into its folder, to know the folder as its own


def read_train_config(output_dir: str | Path) -> dict:
    """OUTPUT_DIR/train_config.json, with a message saying what to do when it is missing or unreadable."""
    path = Path(output_dir) / "train_config.json"
    if not path.is_file():
        raise SystemExit(f"{path} not found: {output_dir} is not a folder written by train.py or export.py. "
                         "Train first, or pass --output_dir=<train.py's output_dir>.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise SystemExit(f"{path}: not readable JSON ({error}); it was cut short or edited. Train again, or restore "
                         "it from a copy.") from None
    needed = ("model_id", "prompt", "min_pixels", "max_pixels", "image_size")
    lacking = [key for key in needed if key not in config] if isinstance(config, dict) else list(needed)
    if lacking:
        raise SystemExit(f"{path}: lacks {', '.join(lacking)}; it was not written by this version of train.py. "
                         "Train again.")
    return config


def holds_whole_model(output_dir: str | Path) -> bool:
    """A folder with the model's own weights and config (export.py's, or a full fine-tune's), not an adapter."""
    return (Path(output_dir) / "config.json").is_file()


def base_model(model_id: str, train_config: dict, output_dir: str | Path) -> Path:
    """The base model's folder: model_id, else the one train_config.json records, with a message saying what to pass
    when that was a folder and has moved since."""
    recorded = train_config["model_id"]
    was_folder = train_config.get("model_dir") == str(Path(recorded).expanduser())
    if not model_id and was_folder and not Path(recorded).expanduser().is_dir():
        raise SystemExit(f"{Path(output_dir) / 'train_config.json'}: training's base model was the folder {recorded}, "
                         "which is no longer there. Pass --model_id=<where that model is now> (the folder with "
                         "config.json and the *.safetensors weights).")
    return modeling.resolve_model(model_id or recorded)


def val_json(train_config: dict, output_dir: str | Path) -> Path:
    """The val JSON training scored, from wherever infer.py runs: the absolute path train.py recorded, else (a config
    from before it did, or data that moved) its path from the current folder or from the folder train.py ran in,
    taken to lie as far above output_dir as train.py's own output_dir did."""
    recorded = train_config.get("val_json_path") or ""
    if not recorded:
        raise SystemExit("no --image given, and training had no val set to default to: pass --image=<file, folder "
                         "or JSON>.")
    candidates = [Path(p) for p in (train_config.get("val_json_abspath"), recorded) if p]
    trained_output, here = Path(train_config.get("output_dir", "")), Path(output_dir).resolve()
    if not (Path(recorded).is_absolute() or trained_output.is_absolute()) and \
            0 < len(trained_output.parts) <= len(here.parents):
        candidates.append(here.parents[len(trained_output.parts) - 1] / recorded)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        tried = " nor at ".join(map(str, dict.fromkeys(candidates)))
        raise SystemExit(f"the val JSON training used is not at {tried}. Pass --image=<that JSON, or any image, "
                         "folder of images or conversation JSON>.")
    return found


def inputs(source: Path) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """What --image names (an image, a folder of images or a conversation JSON) as samples that can be predicted,
    and the files that cannot, with the reason; a SystemExit when it names nothing to predict."""
    if source.is_dir():
        # Not .DS_Store and the like, nor the record data2csv.py keeps among the images it saved.
        entries = sorted(p for p in source.iterdir() if not p.name.startswith(".") and p.name != SOURCE_RECORD)
        files = [p for p in entries if not p.is_dir()]
        if not files:
            raise SystemExit(f"--image={source}: no files in this folder" + (
                "; images in its subfolders are not read: pass --image=<a subfolder>" if entries else "") + ".")
        samples = [Sample(p.name, p.resolve(), "") for p in files]
    elif source.suffix.lower() == ".json":
        samples = read_conversations(source, require_text=False)
    elif source.is_file():
        samples = [Sample(source.name, source.resolve(), "")]
    else:
        raise SystemExit(f"--image={source}: no such file or folder. Give an image, a folder of images or a JSON.")
    problems = {s.id: image_problem(s.image) for s in samples}
    return ([s for s in samples if not problems[s.id]],
            [(s.image, f"{s.id}: {problems[s.id]}") for s in samples if problems[s.id]])


@dataclass
class Predictor:
    model: object
    processor: object
    prompt: str
    image_sizing: dict
    description: str  # what was loaded, for the user: "tiny-random + adapter output/...", "... (whole model)"
    train_config: dict
    compile_setting: str  # auto | true | false: a static KV cache, the decode steps as CUDA graphs (modeling.predict)

    def compiles(self, images: int) -> bool:
        """Whether predicting `images` images compiles (modeling.compiles_generation)."""
        return modeling.compiles_generation(self.compile_setting, str(self.model.device), self.model.dtype, images)

    def predict(self, images: list, batch_size: int = 64, max_new_tokens: int = 256,
                show_progress: bool = True) -> list[str]:
        return modeling.predict(self.model, self.processor, images, self.prompt, self.image_sizing, batch_size,
                                max_new_tokens, show_progress, self.compiles(len(images)))


def load(output_dir: str | Path, adapter: str = "", model_id: str = "", precision: str = "auto",
         device: str = "auto", compile_generation: str = "false") -> Predictor:
    """The run in output_dir ready to predict. adapter: another adapter folder, or "none" for the base model alone;
    model_id: another base model than the one training recorded; compile_generation: auto (a CUDA GPU, bf16, and
    COMPILE_PAYS_FROM images or more in a predict call) | true | false."""
    train_config = read_train_config(output_dir)
    whole = holds_whole_model(output_dir)
    use_adapter = adapter.lower() != "none" and not whole
    adapter_dir = Path(adapter or output_dir)
    if use_adapter and not (adapter_dir / "adapter_model.safetensors").is_file():  # before minutes of loading
        raise SystemExit(f"{adapter_dir}: no adapter_model.safetensors. Train first, or pass --adapter=<folder> "
                         "(--adapter=none predicts with the base model alone).")
    device = modeling.check_device(device)
    dtype = modeling.generation_dtype(precision, device)
    own_weights = whole and not model_id  # the folder's own model, not another base model
    model_dir = Path(output_dir) if own_weights else base_model(model_id, train_config, output_dir)
    model_id = model_id or (str(output_dir) if whole else train_config["model_id"])
    # A whole model loads in the dtype it was saved in: a full fine-tune's fp32 weights rounded to bf16 predicted
    # otherwise than train.py's own evaluation did (9 of 32 held-out formulas, bench/agreement.py on the H200)
    model, processor = modeling.load_base_model(model_dir, device, dtype="auto" if own_weights else None)
    if use_adapter:
        model = modeling.load_adapter(model, adapter_dir, model_id)
    model = modeling.generation_model(model, dtype)
    generation = ""
    if modeling.compiles_generation(compile_generation, device, dtype, modeling.COMPILE_PAYS_FROM):
        generation = ", static KV cache" + (" and CUDA graphs" if device.startswith("cuda") else "") + (
            f" from {modeling.COMPILE_PAYS_FROM:,} images on" if compile_generation == "auto" else "")
    in_dtype = str(dtype).removeprefix("torch.")
    description = model_id + (f" + adapter {adapter_dir}" if use_adapter else " (whole model)" if whole
                              else " (no adapter)") + f" on {device}, in {in_dtype}{generation}"
    return Predictor(model, processor, train_config["prompt"], chat.recorded_sizing(train_config), description,
                     train_config, compile_generation)


# --- export.py's folder ------------------------------------------------------

def _export_record(folder: Path) -> dict | None:
    """What export.py recorded in a folder it wrote, or None when it did not write it."""
    try:
        record = json.loads((folder / EXPORT_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("written_by") == "export.py" else None


def check_export_dir(export_dir: Path, protected: dict[str, Path]) -> bool:
    """Whether export_dir holds an earlier export (or nothing at all) to replace; False when it does not exist.
    Anything else stops the run with what to do: a file, a link, a folder export.py did not write, an earlier export
    with files added since, or a folder that is or holds one of `protected` (what it is -> its path)."""
    target = export_dir.resolve()
    for what, path in protected.items():
        if target == Path(path).resolve() or target in Path(path).resolve().parents:
            raise SystemExit(f"--export_dir={export_dir} is or holds {what} {path}, which the export would replace. "
                             "Pass another --export_dir (by default it is <output_dir>-merged).")
    if export_dir.is_symlink() or (export_dir.exists() and not export_dir.is_dir()):
        raise SystemExit(f"--export_dir={export_dir} is a file or a link, not a folder export.py wrote: it is never "
                         "replaced. Pass another --export_dir, or move it away.")
    if not export_dir.exists():
        return False
    names = {p.name for p in export_dir.iterdir()}
    record = _export_record(export_dir)
    if names and record is None:
        raise SystemExit(f"--export_dir={export_dir} is a folder export.py did not write (it holds no {EXPORT_RECORD}"
                         "): it is never replaced. Pass another --export_dir, or move that folder away.")
    added = sorted(names - set(record.get("files", [])) - {EXPORT_RECORD}) if record else []
    if added:
        raise SystemExit(f"--export_dir={export_dir} holds an earlier export and files added to it since "
                         f"({', '.join(added[:5])}): it is not replaced, so that they are kept. Move them out, or pass "
                         "another --export_dir.")
    return True


def _staging_folders(export_dir: Path) -> list[Path]:
    """The hidden folders beside export_dir that export.py writes into (mkdtemp's names) or moves the earlier export
    to, left there by a run that was killed."""
    pattern = re.compile(rf"\.{re.escape(export_dir.name)}\.[a-z0-9_]{{8}}(\.old)?")
    return [p for p in export_dir.parent.glob(f".{export_dir.name}.*")
            if pattern.fullmatch(p.name) and p.is_dir() and _export_record(p) is not None]


def start_export(export_dir: Path) -> tuple[Path, int]:
    """A new hidden folder beside export_dir to write the export into, its record in it from the start, so that one
    left by a killed run is known as export.py's and removed by the next; returns it and how many were removed."""
    export_dir.parent.mkdir(parents=True, exist_ok=True)
    leftovers = _staging_folders(export_dir)
    for folder in leftovers:
        shutil.rmtree(folder)
    staging = staging_folder(export_dir)
    atomic_write_text(staging / EXPORT_RECORD, json.dumps({"written_by": "export.py", "files": []}) + "\n")
    return staging, len(leftovers)


def finish_export(staging: Path, export_dir: Path, details: dict) -> None:
    """Record the files staging holds, give them the modes open() and mkdir() would, and rename it to export_dir,
    in place of the earlier export check_export_dir found there."""
    make_readable(staging)
    files = sorted(p.name for p in staging.iterdir() if p.name != EXPORT_RECORD)
    atomic_write_text(staging / EXPORT_RECORD, json.dumps({"written_by": "export.py", "files": files, **details},
                                                          indent=1) + "\n")
    if export_dir.exists():
        previous = staging.with_name(staging.name + ".old")
        os.replace(export_dir, previous)
        os.replace(staging, export_dir)
        shutil.rmtree(previous)
    else:
        os.replace(staging, export_dir)
