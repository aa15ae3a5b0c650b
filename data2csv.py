"""Get the LaTeX_OCR dataset, save its images, and write a CSV of image_path,text.

Reads:  AI-ModelScope/LaTeX_OCR from ModelScope (default), its Hugging Face mirror linxy/LaTeX_OCR, a local
        file or folder, or nothing at all (synthetic formulas rendered here, offline)
Writes: LaTeX_OCR/<row>.png and latex_ocr_train.csv (image paths relative to the CSV)
Run:    python data2csv.py
        python data2csv.py --source=synthetic --max_data_number=64     (offline)
        python data2csv.py --source=path/to/train.parquet              (columns image, text)
A rerun skips images already saved, so an interrupted download resumes; the CSV is written atomically.
"""

import json
from pathlib import Path

from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
SOURCE = "modelscope"  # modelscope | huggingface | synthetic | a local .parquet/.csv/.jsonl file or parquet folder
DATASET_ID = "AI-ModelScope/LaTeX_OCR"  # ModelScope dataset id
HF_DATASET_ID = "linxy/LaTeX_OCR"  # Hugging Face mirror of the same dataset
SUBSET_NAME = "default"  # default | full | synthetic_handwrite | human_handwrite | ...
SPLIT = "train"  # train (the full subset also has validation and test)
MAX_DATA_NUMBER = 1000  # rows to save, from the start of the split
DATASET_DIR = "LaTeX_OCR"  # folder for the images
CSV_PATH = "latex_ocr_train.csv"
VAL_SPLIT = ""  # a held-out split to save too, e.g. validation with --subset_name=full; "" = none
MAX_VAL_NUMBER = 1000  # rows of VAL_SPLIT to save
VAL_CSV_PATH = "latex_ocr_val.csv"  # csv2json.py takes val from here when it exists
SEED = 0  # synthetic source only: same seed, same formulas and pixels
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

# --- setup -------------------------------------------------------------------
import io  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
from itertools import islice  # noqa: E402

from PIL import Image  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from latexocr.data import atomic_write_text, read_csv, write_csv  # noqa: E402


def synthetic_rows(seed: int, split: str):
    """Formulas with a renderer in place of the image: a rerun only renders images not yet saved."""
    from latexocr import render, synth
    for text in synth.synthetic_texts(seed if split == "train" else f"{seed}-{split}"):
        yield (lambda text=text: render.render_mathtext(text)), text


def table_rows(path: Path):
    """Rows of a local file in the LaTeX_OCR schema: parquet with image/text, or CSV/JSONL of path + text."""
    import pandas as pd
    if path.is_dir() or path.suffix == ".parquet":
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        if not files:
            raise SystemExit(f"{path}: no .parquet files in this folder.")
        frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
        image_column = "image"
    elif path.suffix == ".csv":
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    elif path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=path.suffix == ".jsonl", dtype=False)
    else:
        raise SystemExit(f"--source={path}: expected a .parquet file or folder, a .csv or a .jsonl file.")
    if path.suffix in (".csv", ".jsonl", ".json"):
        image_column = next((c for c in ("image_path", "image") if c in frame.columns), "image_path")
        if image_column in frame.columns:
            frame[image_column] = [str(path.resolve().parent / p) if isinstance(p, str) else p
                                   for p in frame[image_column]]
    if image_column not in frame.columns or "text" not in frame.columns:
        raise SystemExit(f"{path}: expected columns 'image' (or 'image_path') and 'text', found "
                         f"{list(frame.columns)}. Rename the columns to match.")
    return zip(frame[image_column], frame["text"])


def source_rows(split: str):
    """(image, text) pairs of one split of the chosen source; images stay undecoded until needed."""
    if SOURCE == "synthetic":
        return synthetic_rows(SEED, split)
    if SOURCE == "modelscope":
        from modelscope.msdatasets import MsDataset
        try:
            dataset = MsDataset.load(DATASET_ID, subset_name=SUBSET_NAME, split=split)
        except Exception as e:
            raise SystemExit(f"could not load {DATASET_ID} ({SUBSET_NAME}/{split}) from ModelScope "
                             f"({type(e).__name__}: {e}).\nTry --source=huggingface, a local copy "
                             "(--source=path/to/parquet), or --source=synthetic offline.") from None
        return ((row["image"], row["text"]) for row in dataset)
    if SOURCE == "huggingface":
        import datasets
        try:
            dataset = datasets.load_dataset(HF_DATASET_ID, SUBSET_NAME, split=split)
        except Exception as e:
            raise SystemExit(f"could not load {HF_DATASET_ID} ({SUBSET_NAME}/{split}) from Hugging Face "
                             f"({type(e).__name__}: {e}).\nTry --source=modelscope, a local copy "
                             "(--source=path/to/parquet), or --source=synthetic offline.") from None
        return ((row["image"], row["text"]) for row in dataset)
    path = Path(SOURCE).expanduser()
    if split != SPLIT:
        raise SystemExit(f"--val_split={split}: a local file has no splits. Write the held-out rows to their own "
                         f"CSV and pass it to csv2json.py as --val_csv_path.")
    if not path.exists():
        raise SystemExit(f"--source={SOURCE}: not modelscope, huggingface or synthetic, and no such file or folder.")
    return table_rows(path)


def to_image(value) -> Image.Image:
    """A PIL image from what datasets hold: an image, encoded bytes, {'bytes', 'path'}, a path, or a renderer."""
    if callable(value):
        return value()
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        value = Image.open(io.BytesIO(value))
    elif isinstance(value, (str, Path)):
        value = Image.open(value)
    if not isinstance(value, Image.Image):
        raise ValueError(f"unsupported image value of type {type(value).__name__}")
    value.load()
    return value


def save_image(image: Image.Image, path: Path) -> None:
    """PNG (lossless: thin strokes survive), through a temporary file so no half-written image remains."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_split(split: str, image_dir: Path, csv_path: str, max_rows: int) -> str:
    """Save the first max_rows images of one split and write its CSV; return a summary."""
    image_dir.mkdir(parents=True, exist_ok=True)
    # Images are named by row number; a folder filled from another source would pair them with the wrong text.
    origin = {k: config[k] for k in ("source", "dataset_id", "hf_dataset_id", "subset_name")}
    origin.update(split=split, **({"seed": SEED} if SOURCE == "synthetic" else {}))
    origin_path = image_dir / "source.json"
    if origin_path.is_file() and json.loads(origin_path.read_text()) != origin:
        raise SystemExit(f"{image_dir} holds images from another source ({origin_path.read_text().strip()}). "
                         "Use another --dataset_dir, or delete that folder.")
    atomic_write_text(origin_path, json.dumps(origin) + "\n")
    # A killed run leaves its temporary files behind, never a half-written image or CSV (those are renamed
    # into place whole): clear them, so a rerun leaves the folders as an uninterrupted run would.
    csv_file, rejects_path = Path(csv_path), Path(csv_path).with_suffix(".rejects.csv")
    leftovers = [*image_dir.glob(".*.png"), *image_dir.glob(f".{origin_path.name}.*.tmp"),
                 *csv_file.parent.glob(f".{csv_file.name}.*.tmp"), *csv_file.parent.glob(f".{rejects_path.name}.*.tmp")]
    for leftover in leftovers:
        leftover.unlink()
    if leftovers:
        print(f"removed {len(leftovers)} temporary file(s) left by an interrupted run")

    rows, rejects, reused = [], [], 0
    for index, (image, text) in enumerate(tqdm(islice(source_rows(split), max_rows), total=max_rows,
                                               desc=f"saving {split} images", unit="image")):
        path = image_dir / f"{index}.png"
        text = text if isinstance(text, str) else ""
        if path.is_file():
            reused += 1
        else:
            try:
                save_image(to_image(image), path)
            except Exception as e:  # one bad image must not stop a 76k-row download
                rejects.append((path, f"row {index}: image unreadable ({type(e).__name__}: {e})"))
                continue
        rows.append((path, text))

    write_csv(csv_path, rows)
    if rejects:
        write_csv(rejects_path, rejects, header=("image_path", "reason"))
        for path, reason in rejects[:5]:
            print(f"skipped {reason}")
    else:  # an earlier run's list would name rows that are saved now
        rejects_path.unlink(missing_ok=True)
    assert len(read_csv(csv_path)) == len(rows)
    return (f"{len(rows)} {split} rows -> {csv_path}, images in {image_dir}/ ({len(rows) - reused} new, "
            f"{reused} already there), {len(rejects)} skipped" + (f" -> {rejects_path}" if rejects else ""))


# --- work --------------------------------------------------------------------
summaries = [save_split(SPLIT, Path(DATASET_DIR), CSV_PATH, MAX_DATA_NUMBER)]
if VAL_SPLIT:
    summaries.append(save_split(VAL_SPLIT, Path(DATASET_DIR) / VAL_SPLIT, VAL_CSV_PATH, MAX_VAL_NUMBER))

# --- summary -----------------------------------------------------------------
print("done: " + "; ".join(summaries))
