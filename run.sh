#!/usr/bin/env bash
# One entry point for a fresh machine.
#   bash run.sh demo   the whole pipeline offline on CPU: synthetic data, a tiny random model (a few minutes)
#   bash run.sh test   the test suite
#   bash run.sh app    the demo page on the model the demo trained (after bash run.sh demo)
#   bash run.sh        the real pipeline: LaTeX_OCR from ModelScope, Qwen2-VL-2B-Instruct, a CUDA GPU
# Without an active virtual environment it creates .venv here; it installs requirements.txt when that changed.
set -euo pipefail
cd "$(dirname "$0")"

setup() {
    if [ -z "${VIRTUAL_ENV:-}" ]; then
        if [ ! -x .venv/bin/python ]; then
            command -v python3 >/dev/null || { echo "python3 not found: install Python 3.10 or newer." >&2; exit 1; }
            echo "creating the virtual environment .venv"
            python3 -m venv .venv
        fi
        # shellcheck disable=SC1091
        source .venv/bin/activate
    fi
    python -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || { echo "Python 3.10 or newer is needed, found $(python --version)." >&2; exit 1; }
    local stamp="$VIRTUAL_ENV/.latexocr-requirements.txt"
    if ! cmp -s requirements.txt "$stamp"; then
        echo "installing requirements.txt into $VIRTUAL_ENV (torch is several GB the first time)"
        python -m pip install --disable-pip-version-check -q -r requirements.txt
        cp requirements.txt "$stamp"
    fi
}

offline() {
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
}

case "${1:-real}" in
demo)
    setup
    offline
    mkdir -p demo
    cd demo
    python ../data2csv.py --source=synthetic --max_data_number=64
    python ../csv2json.py
    python ../train.py --model_id=tiny-random --max_steps=20 --resume=false  # a second demo trains again
    python ../infer.py
    python ../export.py
    echo
    echo "demo done, everything is in demo/: data (LaTeX_OCR/, latex_ocr_*.csv, latex_ocr_*.json), the adapter"
    echo "and its config (output/Qwen2-VL-2B-LatexOCR/), the model with the adapter merged in"
    echo "(output/Qwen2-VL-2B-LatexOCR-merged/), SwanLab logs (swanlog/). The tiny model is random and"
    echo "barely trained, so its scores are near zero: the demo shows that every step runs."
    echo "metrics: demo/output/Qwen2-VL-2B-LatexOCR/infer/metrics.json"
    echo "report:  demo/output/Qwen2-VL-2B-LatexOCR/infer/report.html (open it in a browser)"
    echo "page:    bash run.sh app   (serves the demo's model; then open http://127.0.0.1:7860)"
    ;;
app)
    setup
    offline
    shift
    python app.py --output_dir=demo/output/Qwen2-VL-2B-LatexOCR "$@"
    ;;
test)
    setup
    offline
    shift
    python -m pytest -q tests "$@"
    ;;
real)
    setup
    if ! python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        echo "No CUDA GPU found. The real pipeline fine-tunes Qwen2-VL-2B-Instruct and needs a GPU with about"
        echo "20 GB of memory. On this machine, 'bash run.sh demo' runs every step offline with a tiny model."
        exit 1
    fi
    echo "The real pipeline downloads LaTeX_OCR and Qwen2-VL-2B-Instruct (~4.5 GB) from ModelScope."
    echo "Without network, copy the model here and pass --model_id=/path/to/it to train.py (see README)."
    python data2csv.py
    python csv2json.py
    python train.py
    python infer.py
    ;;
*)
    echo "usage: bash run.sh [demo|test|app]" >&2
    exit 2
    ;;
esac
