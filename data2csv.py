"""Get the LaTeX_OCR dataset, save its images, and write a CSV of image_path,text.

Reads:  AI-ModelScope/LaTeX_OCR from ModelScope (default), its Hugging Face mirror linxy/LaTeX_OCR, a local
        file or folder, or nothing at all (synthetic formulas rendered here, offline)
Writes: LaTeX_OCR/<row>.png and latex_ocr_train.csv (image paths relative to the CSV); where they came from in
        LaTeX_OCR/source.json and latex_ocr_train.source.json (a local file by its sha256)
Run:    python data2csv.py
        python data2csv.py --source=synthetic --max_data_number=64     (offline)
        python data2csv.py --source=path/to/train.parquet              (columns image, text)
A rerun skips images already saved, so an interrupted download resumes; the CSV is written atomically. A folder
of images saved from another source (or from a local file since changed) is refused, never mixed with new text.
"""

import json
from pathlib import Path

from latexocr import settings
from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
SOURCE = "modelscope"  # modelscope | huggingface | synthetic | a local .parquet/.csv/.tsv/.json(l) or parquet folder
DATASET_ID = "AI-ModelScope/LaTeX_OCR"  # ModelScope dataset id
HF_DATASET_ID = "linxy/LaTeX_OCR"  # Hugging Face mirror of the same dataset
SUBSET_NAME = "default"  # default | full | synthetic_handwrite | human_handwrite | ...
SPLIT = "train"  # train (the full subset also has validation and test)
REVISION = ""  # a hub dataset's revision (commit or tag) to load; "" = the latest
MAX_DATA_NUMBER = 1000  # rows to save, from the start of the split; -1 = all
DATASET_DIR = "LaTeX_OCR"  # folder for the images
CSV_PATH = "latex_ocr_train.csv"
VAL_SPLIT = ""  # a held-out split to save too, e.g. validation with --subset_name=full; "" = none
MAX_VAL_NUMBER = 1000  # rows of VAL_SPLIT to save; -1 = all
VAL_CSV_PATH = "latex_ocr_val.csv"  # csv2json.py takes val from here when it exists
SEED = 0  # synthetic source only: same seed, same formulas and pixels
# -----------------------------------------------------------------------------
config = apply_overrides(globals(), rules=settings.DATA2CSV)

# --- setup -------------------------------------------------------------------
import io  # noqa: E402
import re  # noqa: E402
from itertools import islice  # noqa: E402

from PIL import Image, ImageOps  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from latexocr import data  # noqa: E402

HUBS = ("modelscope", "huggingface")
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"}  # what PNG stores as it is; others become RGB
LOCAL_SUFFIXES = (".parquet", ".csv", ".tsv", ".json", ".jsonl")
local_source = Path(SOURCE).expanduser() if SOURCE not in (*HUBS, "synthetic") else None
if local_source is not None and not local_source.exists():
    raise SystemExit(f"--source={SOURCE}: not modelscope, huggingface or synthetic, and no such file or folder.")
if local_source is not None and local_source.is_file() and local_source.suffix.lower() not in LOCAL_SUFFIXES:
    raise SystemExit(f"--source={SOURCE}: expected a .parquet file or folder, a .csv, .tsv, .json or .jsonl file.")
data.check_distinct({"source": SOURCE if local_source and local_source.is_file() else "", "csv_path": CSV_PATH,
                     "val_csv_path": VAL_CSV_PATH if VAL_SPLIT else ""})
if SOURCE == "synthetic" and -1 in (MAX_DATA_NUMBER, MAX_VAL_NUMBER if VAL_SPLIT else 0):
    raise SystemExit("--source=synthetic has no end, so -1 (all rows) would never finish: pass a number of rows, "
                     "e.g. --max_data_number=1000.")
if VAL_SPLIT == SPLIT:
    raise SystemExit(f"--val_split={VAL_SPLIT} is the training split itself: val would be training rows. Pass a "
                     "held-out split (e.g. validation with --subset_name=full), or none.")


def local_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("**/*.parquet"))
    if not files:
        raise SystemExit(f"{path}: no .parquet files in this folder.")
    return files


def source_record(split: str) -> dict:
    """What the rows of one split are, recorded beside the images and the CSV and checked on every rerun."""
    if SOURCE == "synthetic":
        return {"source": SOURCE, "seed": SEED, "split": split}
    if SOURCE in HUBS:
        return {"source": SOURCE, "dataset_id": DATASET_ID if SOURCE == "modelscope" else HF_DATASET_ID,
                "subset_name": SUBSET_NAME, "split": split, **({"revision": REVISION} if REVISION else {})}
    return {"source": "local", "path": str(local_source.resolve()),
            "sha256": data.fingerprint(local_files(local_source)), "split": split}


def synthetic_rows(seed: int, split: str):
    """Formulas with a renderer in place of the image: a rerun only renders images not yet saved."""
    from latexocr import render, synth
    for text in synth.synthetic_texts(seed if split == "train" else f"{seed}-{split}"):
        yield (lambda text=text: render.render_mathtext(text)), text


def listed(record: dict, where: str, listing: Path):
    """(image, text) of a local record; an image path is read from the folder of the file that lists it."""
    column = next((c for c in ("image_path", "image") if c in record), None)
    if column is None or "text" not in record:
        raise SystemExit(f"{where}: expected columns 'image' (or 'image_path') and 'text', found {list(record)}. "
                         "Rename the columns to match.")
    image = record[column]
    if isinstance(image, dict) and not image.get("bytes") and image.get("path"):  # the datasets layout, no bytes
        image = image["path"]
    return (data.resolve_from_file(image, listing) if isinstance(image, str) else image), record["text"]


def table_rows(path: Path):
    """Rows of a local file in the LaTeX_OCR schema: parquet with image/text, or CSV/TSV/JSON/JSONL of path + text."""
    import pandas as pd
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".parquet":
        for file in local_files(path):
            try:
                frame = pd.read_parquet(file)
            except Exception as e:  # pyarrow's many error types
                raise SystemExit(f"{file}: not a readable parquet file ({type(e).__name__}: {e}).") from None
            for record in frame.to_dict("records"):
                yield listed(record, str(file), file)
    elif suffix in (".csv", ".tsv"):
        for _, record in data.read_table(path)[1]:
            yield listed(record, str(path), path)
    else:
        records = data.read_json_lines(path) if suffix == ".jsonl" else data.read_json(path)
        if not isinstance(records, list):
            raise SystemExit(f"{path}: expected a list of records with 'image_path' and 'text', found "
                             f"{type(records).__name__}.")
        records = records if suffix == ".jsonl" else enumerate(records)
        for number, record in records:
            where = f"{path}, " + (f"line {number}" if suffix == ".jsonl" else f"record {number}")
            if not isinstance(record, dict):
                raise SystemExit(f"{where}: expected an object with 'image_path' and 'text', found {str(record)[:100]}")
            yield listed(record, where, path)


def source_rows(split: str):
    """(image, text) pairs of one split of the chosen source; images stay undecoded until needed."""
    if SOURCE == "synthetic":
        return synthetic_rows(SEED, split)
    if SOURCE == "modelscope":
        from modelscope.msdatasets import MsDataset
        try:
            dataset = MsDataset.load(DATASET_ID, subset_name=SUBSET_NAME, split=split,
                                   **({"version": REVISION} if REVISION else {}))
        except Exception as e:
            raise SystemExit(f"could not load {DATASET_ID} ({SUBSET_NAME}/{split}) from ModelScope "
                             f"({type(e).__name__}: {e}).\nTry --source=huggingface, a local copy "
                             "(--source=path/to/parquet), or --source=synthetic offline.") from None
        return ((row["image"], row["text"]) for row in dataset)
    if SOURCE == "huggingface":
        import datasets
        try:
            dataset = datasets.load_dataset(HF_DATASET_ID, SUBSET_NAME, split=split,
                                            **({"revision": REVISION} if REVISION else {}))
        except Exception as e:
            raise SystemExit(f"could not load {HF_DATASET_ID} ({SUBSET_NAME}/{split}) from Hugging Face "
                             f"({type(e).__name__}: {e}).\nTry --source=modelscope, a local copy "
                             "(--source=path/to/parquet), or --source=synthetic offline.") from None
        return ((row["image"], row["text"]) for row in dataset)
    if split != SPLIT:
        raise SystemExit(f"--val_split={split}: a local file has no splits. Write the held-out rows to their own "
                         f"CSV and pass it to csv2json.py as --val_csv_path.")
    return table_rows(local_source)


def to_image(value) -> Image.Image:
    """A PIL image, upright, from what datasets hold: an image, encoded bytes, {'bytes', 'path'}, a path, or a
    renderer. Modes PNG cannot store (CMYK, ...) become RGB as training would see them."""
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
    value = ImageOps.exif_transpose(value)  # the PNG keeps no orientation tag: turn the pixels themselves
    return value if value.mode in PNG_MODES else data.open_image(value)


def check_image_folder(image_dir: Path, record: dict) -> None:
    """Images are named by row number: a folder filled from another source would pair them with the wrong text."""
    saved = data.read_source(image_dir / data.SOURCE_RECORD)
    if not any(re.fullmatch(r"\d+\.png", p.name) for p in image_dir.iterdir()):
        return  # no image to pair wrongly, whatever the record says
    if saved is None:
        raise SystemExit(f"{image_dir} holds numbered images that data2csv.py has no record of saving (no "
                         "source.json). Pass another --dataset_dir, or move those images away.")
    if not data.same_source(saved, record):
        if record["source"] == "local" and saved.get("path") == record["path"]:
            raise SystemExit(f"{image_dir} holds images saved from {record['path']} as it was before (sha256 "
                             f"{saved['sha256'][:12]}); the file has changed since (sha256 {record['sha256'][:12]}), "
                             "and its rows would be paired with the old images. Use another --dataset_dir, or delete "
                             "that folder to save them again.")
        raise SystemExit(f"{image_dir} holds images from another source: {data.describe_source(saved)}, not "
                         f"{data.describe_source(record)}. Use another --dataset_dir, or delete that folder to save "
                         "them again.")


def save_split(split: str, image_dir: Path, csv_path: str, max_rows: int) -> str:
    """Save the first max_rows images of one split (-1: all) and write its CSV; return a summary."""
    record = source_record(split)
    image_dir.mkdir(parents=True, exist_ok=True)
    check_image_folder(image_dir, record)
    data.atomic_write_text(image_dir / data.SOURCE_RECORD, json.dumps(record) + "\n")
    # A killed run leaves its temporary files behind, never a half-written image or CSV (those are renamed
    # into place whole): clear them, so a rerun leaves the folders as an uninterrupted run would.
    csv_file, rejects_path = Path(csv_path), Path(csv_path).with_suffix(".rejects.csv")
    record_path = data.source_record_path(csv_file)
    leftovers = [*image_dir.glob(".*.png"), *image_dir.glob(f".{data.SOURCE_RECORD}.*.tmp"),
                 *[p for f in (csv_file, rejects_path, record_path) for p in f.parent.glob(f".{f.name}.*.tmp")]]
    for leftover in leftovers:
        leftover.unlink()
    if leftovers:
        print(f"removed {len(leftovers)} temporary file(s) left by an interrupted run")

    rows, rejects, reused, seen = [], [], 0, 0
    wanted = None if max_rows == -1 else max_rows
    for index, (image, text) in enumerate(tqdm(islice(source_rows(split), wanted), total=wanted,
                                               desc=f"saving {split} images", unit="image")):
        seen = index + 1
        path = image_dir / f"{index}.png"
        formula = data.formula_text(text)
        if formula is None:
            rejects.append((path, f"row {index}: the text is a {type(text).__name__}, not a formula"))
            continue
        if path.is_file():
            reused += 1
        else:
            problem = data.image_problem(image) if isinstance(image, Path) else None  # a local file: say why
            if not problem:
                try:
                    picture = to_image(image)
                    data.atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"), suffix=".png")
                except Exception as e:  # one bad image must not stop a 76k-row download
                    problem = f"image unreadable ({type(e).__name__}: {e})"
            if problem:
                rejects.append((path, f"row {index}: {problem}"))
                continue
        rows.append((path, formula))
    if wanted and seen < wanted:
        print(f"note: the source's {split} split has {seen} rows, fewer than the {wanted} asked for: saved them all")

    record_path.unlink(missing_ok=True)  # never beside a CSV of other rows, even for a moment
    data.write_csv(csv_path, rows)
    data.atomic_write_text(record_path, json.dumps(record) + "\n")
    if rejects:
        data.write_csv(rejects_path, rejects, header=("image_path", "reason"))
        for path, reason in rejects[:5]:
            print(f"skipped {reason}")
    else:  # an earlier run's list would name rows that are saved now
        rejects_path.unlink(missing_ok=True)
    if not rows:
        raise SystemExit(f"{split}: none of the {seen} rows could be saved" + (f" (reasons in {rejects_path})"
                         if rejects else ", the source is empty") + ".")
    return (f"{len(rows)} {split} rows -> {csv_path}, images in {image_dir}/ ({len(rows) - reused} new, "
            f"{reused} already there), {len(rejects)} skipped" + (f" -> {rejects_path}" if rejects else ""))


# --- work --------------------------------------------------------------------
summaries = [save_split(SPLIT, Path(DATASET_DIR), CSV_PATH, MAX_DATA_NUMBER)]
if VAL_SPLIT:
    summaries.append(save_split(VAL_SPLIT, Path(DATASET_DIR) / VAL_SPLIT, VAL_CSV_PATH, MAX_VAL_NUMBER))
else:
    stale = data.read_source(data.source_record_path(VAL_CSV_PATH)) if Path(VAL_CSV_PATH).is_file() else None
    if stale and not data.same_source(stale, source_record(SPLIT), ignore=("split",)):
        print(f"note: {VAL_CSV_PATH} holds held-out rows of another source ({data.describe_source(stale)}); "
              f"csv2json.py will refuse it. Delete it, or save this source's held-out split with --val_split.")

# --- summary -----------------------------------------------------------------
print("done: " + "; ".join(summaries))
