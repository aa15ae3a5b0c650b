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
from latexocr import data, sources  # noqa: E402

source = sources.source(SOURCE, SPLIT, DATASET_ID, HF_DATASET_ID, SUBSET_NAME, REVISION, SEED)
data.check_distinct({"source": SOURCE if source.local and source.local.is_file() else "", "csv_path": CSV_PATH,
                     "val_csv_path": VAL_CSV_PATH if VAL_SPLIT else ""})
if SOURCE == "synthetic" and -1 in (MAX_DATA_NUMBER, MAX_VAL_NUMBER if VAL_SPLIT else 0):
    raise SystemExit("--source=synthetic has no end, so -1 (all rows) would never finish: pass a number of rows, "
                     "e.g. --max_data_number=1000.")
if VAL_SPLIT == SPLIT:
    raise SystemExit(f"--val_split={VAL_SPLIT} is the training split itself: val would be training rows. Pass a "
                     "held-out split (e.g. validation with --subset_name=full), or none.")

# --- work --------------------------------------------------------------------
summaries = [sources.save_split(source, SPLIT, Path(DATASET_DIR), CSV_PATH, MAX_DATA_NUMBER)]
if VAL_SPLIT:
    summaries.append(sources.save_split(source, VAL_SPLIT, Path(DATASET_DIR) / VAL_SPLIT, VAL_CSV_PATH,
                                        MAX_VAL_NUMBER))
else:
    stale = data.read_source(data.source_record_path(VAL_CSV_PATH)) if Path(VAL_CSV_PATH).is_file() else None
    if stale and not data.same_source(stale, sources.record(source, SPLIT), ignore=("split",)):
        print(f"note: {VAL_CSV_PATH} holds held-out rows of another source ({data.describe_source(stale)}); "
              f"csv2json.py will refuse it. Delete it, or save this source's held-out split with --val_split.")

# --- summary -----------------------------------------------------------------
print("done: " + "; ".join(summaries))
