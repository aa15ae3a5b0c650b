"""Turn the image/text CSV into train and val conversation JSON files.

Reads:  latex_ocr_train.csv (written by data2csv.py) and the images it lists; latex_ocr_val.csv too when
        data2csv.py saved a held-out split there
Writes: latex_ocr_train.json, latex_ocr_val.json; latex_ocr_rejects.csv listing any row left out and why
Run:    python csv2json.py
Rows whose image is missing or unreadable, or whose text is empty, are skipped and recorded in the rejects
file (never dropped silently). Val comes from the held-out CSV when there is one, else from a seeded split
of the training rows. Train and val never share a formula.
"""

import random
from pathlib import Path

from latexocr.config import apply_overrides

# -----------------------------------------------------------------------------
CSV_PATH = "latex_ocr_train.csv"  # from data2csv.py
VAL_CSV_PATH = "latex_ocr_val.csv"  # held-out rows from data2csv.py --val_split; used for val when it exists
TRAIN_JSON_PATH = "latex_ocr_train.json"
VAL_JSON_PATH = "latex_ocr_val.json"
REJECTS_PATH = "latex_ocr_rejects.csv"  # rows left out, with the reason
VAL_SIZE = 100  # samples scored after training; without a held-out CSV, capped at a tenth of the rows
SEED = 42  # shuffles rows before the split
# -----------------------------------------------------------------------------
config = apply_overrides(globals())

# --- setup -------------------------------------------------------------------
from tqdm.auto import tqdm  # noqa: E402

from latexocr.data import image_problem, read_csv, write_conversations, write_csv  # noqa: E402
from latexocr.metrics import normalize  # noqa: E402


def usable_rows(csv_path: str, rejects: list) -> list[tuple[Path, str]]:
    """(image, text) of the rows that can be trained on; the others go to `rejects` with the reason."""
    good = []
    for line, image, text in tqdm(read_csv(csv_path), desc=f"checking {csv_path}", unit="row"):
        problem = "empty text" if not text.strip() else image_problem(image)
        if problem:
            rejects.append((image, f"{csv_path} line {line}: {problem}"))
        else:
            good.append((image, text.strip()))
    return good


# --- data --------------------------------------------------------------------
rejects = []
rows = usable_rows(CSV_PATH, rejects)
held_out = usable_rows(VAL_CSV_PATH, rejects) if Path(VAL_CSV_PATH).is_file() else None
for image, reason in rejects[:5]:
    print(f"skipped {reason}: {image}")
if not rows:
    raise SystemExit(f"{CSV_PATH}: none of its rows is usable (see above). Rerun data2csv.py.")

# --- split -------------------------------------------------------------------
rng = random.Random(SEED)
rng.shuffle(rows)
if held_out is not None:
    rng.shuffle(held_out)
    val, train = held_out[:VAL_SIZE], rows
    print(f"val: {len(val)} of {len(held_out)} held-out rows from {VAL_CSV_PATH}")
else:
    val_size = VAL_SIZE
    if val_size > len(rows) // 10:
        val_size = max(1, len(rows) // 10)
        print(f"val_size={VAL_SIZE} would leave too little to train on with {len(rows)} rows: "
              f"holding out {val_size} (a tenth). Set --val_size to choose.")
    val, train = rows[:val_size], rows[val_size:]
if not val:
    raise SystemExit(f"{VAL_CSV_PATH}: no usable held-out rows. Fix or delete it to split val from {CSV_PATH}.")
val_formulas = {normalize(text) for _, text in val}
overlap = [(image, text) for image, text in train if normalize(text) in val_formulas]
train = [(image, text) for image, text in train if normalize(text) not in val_formulas]
if overlap:
    print(f"left out of train: {len(overlap)} row(s) whose formula is also in val (recorded in {REJECTS_PATH})")
if not train:
    raise SystemExit(f"{CSV_PATH}: no rows left for training once val formulas are left out.")

# --- save --------------------------------------------------------------------
write_conversations(TRAIN_JSON_PATH, train)
write_conversations(VAL_JSON_PATH, val)
rejects += [(image, "formula also in val") for image, _ in overlap]
if rejects:
    write_csv(REJECTS_PATH, rejects, header=("image_path", "reason"))
else:
    Path(REJECTS_PATH).unlink(missing_ok=True)

# --- summary -----------------------------------------------------------------
print(f"done: {len(train)} train -> {TRAIN_JSON_PATH}, {len(val)} val -> {VAL_JSON_PATH}, "
      f"{len(rejects)} left out" + (f" -> {REJECTS_PATH}" if rejects else ""))
