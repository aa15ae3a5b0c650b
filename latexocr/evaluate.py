"""Predict a set of samples, score the predictions, and write them where people and tools can read them.

Writes into an eval folder: predictions.jsonl (one line per sample: id, image, prediction, reference,
per-sample scores), metrics.json, and report.html (each input image beside its prediction and reference
rendered, worst first). Used by train.py after training and by infer.py.
"""

import base64
import functools
import html
import io
import json
from pathlib import Path

from PIL import Image

from latexocr import metrics, modeling, render
from latexocr.data import Sample, atomic_write_text, open_image


def evaluate(model, processor, samples: list[Sample], prompt: str, image_sizing: dict,
             eval_dir: Path, batch_size: int, max_new_tokens: int, render_formulas: bool = True,
             worst: int = 3, best: int = 2, compile_generation: bool = False) -> dict:
    """Score `samples` (with references), predicted by modeling.predict (compile_generation: its static cache and
    CUDA graphs); print the `worst` and `best` predictions, the metrics table and the path of the report, which
    shows them all."""
    if not samples:
        raise SystemExit("no samples to score.")
    unlabelled = [s.id for s in samples if not s.text.strip()]
    if unlabelled:  # an empty prediction would match it: a perfect score for nothing
        raise SystemExit(f"{len(unlabelled)} sample(s) have an empty reference (first: {unlabelled[0]}); they cannot "
                         "be scored. Fill them in, or leave them out.")
    predictions = modeling.predict(model, processor, [s.image for s in samples], prompt, image_sizing,
                                   batch_size, max_new_tokens, compile_generation=compile_generation)
    references = [s.text for s in samples]
    scores = metrics.score(predictions, references)
    rows = [dict(id=s.id, image=str(s.image), prediction=p, reference=s.text, **metrics.sample_scores(p, s.text))
            for s, p in zip(samples, predictions)]
    draw = None
    if render_formulas:
        backend = render.available_backend()
        draw = functools.lru_cache(maxsize=4096)(functools.partial(render.render, backend=backend))
        matches = metrics.render_matches(predictions, references, draw)
        for row, match in zip(rows, matches):
            row["render_match"] = match
        scores.update(metrics.summarize_render_matches(matches), renderer=backend)

    eval_dir = Path(eval_dir)
    clear_scores(eval_dir)  # a run stopped between the files below must not leave older scores beside these
    atomic_write_text(eval_dir / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(eval_dir / "metrics.json", json.dumps(scores, indent=1) + "\n")
    report_path = write_report(eval_dir / "report.html", rows, scores, draw)
    ranked = list(enumerate(worst_first(rows), 1))
    for rank, row in ranked[:worst] + ranked[max(worst, len(ranked) - best):]:
        mark = "ok " if row["exact_match"] else "   "
        print(f"{mark}{row['id']} ({rank} of {len(ranked)}, worst first)\n    predicted: {row['prediction']}\n"
              f"    reference: {row['reference']}")
    print(metrics.format_table(scores))
    print(f"eval: {len(rows)} predictions in {eval_dir / 'predictions.jsonl'}, metrics in {eval_dir / 'metrics.json'}")
    print(f"report: {report_path}")
    return scores


REPORT_TITLE = "LaTeX OCR evaluation"


def clear_scores(eval_dir: Path) -> list[Path]:
    """Remove the metrics.json and report.html an earlier evaluation wrote in eval_dir, so that they are never taken
    for the scores of newer predictions there; files of those names that it did not write are left. Returns the
    removed."""
    def ours(path: Path) -> bool:
        try:
            text = path.read_text(encoding="utf-8")
            return ("exact_match" in json.loads(text) if path.suffix == ".json"
                    else f"<title>{REPORT_TITLE}</title>" in text)
        except (OSError, ValueError, TypeError):
            return False
    removed = [p for p in (Path(eval_dir) / "metrics.json", Path(eval_dir) / "report.html") if p.is_file() and ours(p)]
    for path in removed:
        path.unlink()
    return removed


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _picture(draw, latex: str) -> str:
    """The formula rendered, or a note saying why it cannot be."""
    if draw is None:
        return ""
    if not latex.strip():
        return '<span class="bad">empty prediction</span>'
    try:
        return f'<img src="{_data_uri(draw(metrics.normalize(latex)))}">'
    except ValueError:
        return '<span class="bad">does not render</span>'


def worst_first(rows: list[dict]) -> list[dict]:
    """Wrong before right, and among them the farthest from the reference first."""
    return sorted(rows, key=lambda r: (r["exact_match"], -r["edit_distance"]))


def write_report(path: Path, rows: list[dict], scores: dict, draw=None, limit: int = 200) -> Path:
    """A self-contained HTML page: per sample the input image, the prediction and the reference (rendered
    when `draw` is given), and the scores; worst first, at most `limit` samples."""
    shown = worst_first(rows)[:limit]
    summary = " &middot; ".join(f"{html.escape(k)} <b>{v:.4f}</b>" if isinstance(v, float) else
                                f"{html.escape(k)} <b>{html.escape(str(v))}</b>" for k, v in scores.items())
    rendered = {True: "renders the same", False: "renders differently", None: "reference does not render"}
    body = []
    for rank, row in enumerate(shown, 1):
        source = _data_uri(open_image(row["image"]))  # upright, as the model saw it
        verdict = "ok" if row["exact_match"] else "bad"
        body.append(
            f'<tr><td>{rank}<br><small>{html.escape(row["id"])}</small></td>'
            f'<td><img src="{source}"></td>'
            f'<td>{_picture(draw, row["prediction"])}<pre>{html.escape(row["prediction"])}</pre></td>'
            f'<td>{_picture(draw, row["reference"])}<pre>{html.escape(row["reference"])}</pre></td>'
            f'<td class="{verdict}">exact {row["exact_match"]}<br>edit {row["edit_distance"]:.3f}<br>'
            f'BLEU {row["bleu"]:.3f}'
            + (f'<br>{rendered[row["render_match"]]}' if "render_match" in row else "") + "</td></tr>")
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{REPORT_TITLE}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px; vertical-align: top; text-align: left; }}
img {{ max-width: 420px; display: block; margin-bottom: 4px; }}
pre {{ white-space: pre-wrap; max-width: 420px; font-size: 11px; margin: 0; }}
.ok {{ background: #e6f4e6; }} .bad {{ background: #fbe9e9; }}
</style></head><body>
<h1>{REPORT_TITLE}</h1>
<p>{summary}</p>
<p>{len(shown)} of {len(rows)} samples, worst first.</p>
<table><tr><th>#</th><th>input image</th><th>prediction</th><th>reference</th><th>scores</th></tr>
{chr(10).join(body)}
</table></body></html>
"""
    atomic_write_text(path, page)
    return path


def swanlab_images(eval_dir: Path, limit: int = 32) -> list:
    """The first `limit` val images with their predictions as captions, for the SwanLab dashboard."""
    import swanlab
    rows = [json.loads(line) for line in (Path(eval_dir) / "predictions.jsonl").read_text().splitlines()[:limit]]
    return [swanlab.Image(r["image"], caption=f"pred: {r['prediction']}\nref: {r['reference']}") for r in rows]
