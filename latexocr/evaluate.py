"""Predict a set of samples, score the predictions, and write them where people and tools can read them.

Writes predictions.jsonl (one line per sample: id, image, prediction, reference, per-sample scores) and
metrics.json into an eval folder. Used by train.py after training and by infer.py.
"""

import json
from pathlib import Path

from latexocr import metrics, modeling
from latexocr.data import Sample, atomic_write_text


def evaluate(model, processor, samples: list[Sample], prompt: str, min_pixels: int, max_pixels: int,
             eval_dir: Path, batch_size: int, max_new_tokens: int, show: int = 8) -> dict:
    """Score `samples` (with references); print `show` predictions and the metrics table."""
    predictions = modeling.predict(model, processor, [s.image for s in samples], prompt, min_pixels, max_pixels,
                                   batch_size, max_new_tokens)
    references = [s.text for s in samples]
    scores = metrics.score(predictions, references)
    rows = [dict(id=s.id, image=str(s.image), prediction=p, reference=s.text, **metrics.sample_scores(p, s.text))
            for s, p in zip(samples, predictions)]
    eval_dir = Path(eval_dir)
    atomic_write_text(eval_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(eval_dir / "metrics.json", json.dumps(scores, indent=1) + "\n")
    for row in rows[:show]:
        mark = "ok " if row["exact_match"] else "   "
        print(f"{mark}{row['id']}\n    predicted: {row['prediction']}\n    reference: {row['reference']}")
    print(metrics.format_table(scores))
    print(f"eval: {len(rows)} predictions in {eval_dir / 'predictions.jsonl'}, metrics in {eval_dir / 'metrics.json'}")
    return scores


def swanlab_images(eval_dir: Path, limit: int = 32) -> list:
    """The first `limit` val images with their predictions as captions, for the SwanLab dashboard."""
    import swanlab
    rows = [json.loads(line) for line in (Path(eval_dir) / "predictions.jsonl").read_text().splitlines()[:limit]]
    return [swanlab.Image(r["image"], caption=f"pred: {r['prediction']}\nref: {r['reference']}") for r in rows]
