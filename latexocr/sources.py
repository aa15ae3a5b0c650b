"""Where data2csv.py's rows come from: ModelScope, Hugging Face, a local file or folder, or synthetic formulas; and
saving one split of them as images plus a CSV, with a record of the source checked on every rerun."""

import io
import json
import re
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from PIL import Image, ImageOps
from tqdm.auto import tqdm

from latexocr import data

HUBS = ("modelscope", "huggingface")
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"}  # what PNG stores as it is; others become RGB
LOCAL_SUFFIXES = (".parquet", ".csv", ".tsv", ".json", ".jsonl")


@dataclass(frozen=True)
class Source:
    name: str  # modelscope | huggingface | synthetic | local
    split: str = "train"
    hub_id: str = ""  # the dataset id on the hub the name says
    subset_name: str = "default"
    revision: str = ""
    seed: int = 0  # synthetic only
    local: Path | None = None  # a local file or folder


def source(setting: str, split: str, dataset_id: str, hf_dataset_id: str, subset_name: str, revision: str,
           seed: int) -> Source:
    """The source data2csv.py's SOURCE names, checked: a local path that exists and is of a kind it reads."""
    if setting in (*HUBS, "synthetic"):
        return Source(setting, split, dataset_id if setting == "modelscope" else hf_dataset_id, subset_name,
                      revision, seed)
    local = Path(setting).expanduser()
    if not local.exists():
        raise SystemExit(f"--source={setting}: not modelscope, huggingface or synthetic, and no such file or folder.")
    if local.is_file() and local.suffix.lower() not in LOCAL_SUFFIXES:
        raise SystemExit(f"--source={setting}: expected a .parquet file or folder, a .csv, .tsv, .json or .jsonl file.")
    return Source("local", split, local=local)


def local_files(path: Path) -> list[Path]:
    if not path.is_dir():
        return [path]
    files = sorted(path.glob("**/*.parquet"))
    if not files:
        raise SystemExit(f"{path}: no .parquet files in this folder.")
    return files


def record(source: Source, split: str) -> dict:
    """What the rows of one split are, recorded beside the images and the CSV and checked on every rerun."""
    if source.name == "synthetic":
        return {"source": source.name, "seed": source.seed, "split": split}
    if source.name in HUBS:
        return {"source": source.name, "dataset_id": source.hub_id, "subset_name": source.subset_name,
                "split": split, **({"revision": source.revision} if source.revision else {})}
    return {"source": "local", "path": str(source.local.resolve()),
            "sha256": data.fingerprint(local_files(source.local)), "split": split}


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


def rows(source: Source, split: str):
    """(image, text) pairs of one split of the source; images stay undecoded until needed."""
    if source.name == "synthetic":
        return synthetic_rows(source.seed, split)
    if source.name == "modelscope":
        from modelscope.msdatasets import MsDataset
        try:
            dataset = MsDataset.load(source.hub_id, subset_name=source.subset_name, split=split,
                                     **({"version": source.revision} if source.revision else {}))
        except Exception as e:
            raise SystemExit(f"could not load {source.hub_id} ({source.subset_name}/{split}) from ModelScope "
                             f"({type(e).__name__}: {e}).\nTry --source=huggingface, a local copy "
                             "(--source=path/to/parquet), or --source=synthetic offline.") from None
        return ((row["image"], row["text"]) for row in dataset)
    if source.name == "huggingface":
        import datasets
        try:
            dataset = datasets.load_dataset(source.hub_id, source.subset_name, split=split,
                                            **({"revision": source.revision} if source.revision else {}))
        except Exception as e:
            raise SystemExit(f"could not load {source.hub_id} ({source.subset_name}/{split}) from Hugging Face "
                             f"({type(e).__name__}: {e}).\nTry --source=modelscope, a local copy "
                             "(--source=path/to/parquet), or --source=synthetic offline.") from None
        return ((row["image"], row["text"]) for row in dataset)
    if split != source.split:
        raise SystemExit(f"--val_split={split}: a local file has no splits. Write the held-out rows to their own "
                         f"CSV and pass it to csv2json.py as --val_csv_path.")
    return table_rows(source.local)


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


def save_split(source: Source, split: str, image_dir: Path, csv_path: str, max_rows: int) -> str:
    """Save the first max_rows images of one split (-1: all) and write its CSV; return a summary."""
    origin = record(source, split)
    image_dir.mkdir(parents=True, exist_ok=True)
    check_image_folder(image_dir, origin)
    data.atomic_write_text(image_dir / data.SOURCE_RECORD, json.dumps(origin) + "\n")
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

    saved, rejects, reused, seen = [], [], 0, 0
    wanted = None if max_rows == -1 else max_rows
    for index, (image, text) in enumerate(tqdm(islice(rows(source, split), wanted), total=wanted,
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
        saved.append((path, formula))
    if wanted and seen < wanted:
        print(f"note: the source's {split} split has {seen} rows, fewer than the {wanted} asked for: saved them all")

    record_path.unlink(missing_ok=True)  # never beside a CSV of other rows, even for a moment
    data.write_csv(csv_path, saved)
    data.atomic_write_text(record_path, json.dumps(origin) + "\n")
    if rejects:
        data.write_csv(rejects_path, rejects, header=("image_path", "reason"))
        for path, reason in rejects[:5]:
            print(f"skipped {reason}")
    else:  # an earlier run's list would name rows that are saved now
        rejects_path.unlink(missing_ok=True)
    if not saved:
        raise SystemExit(f"{split}: none of the {seen} rows could be saved" + (f" (reasons in {rejects_path})"
                         if rejects else ", the source is empty") + ".")
    return (f"{len(saved)} {split} rows -> {csv_path}, images in {image_dir}/ ({len(saved) - reused} new, "
            f"{reused} already there), {len(rejects)} skipped" + (f" -> {rejects_path}" if rejects else ""))
