"""LLaMA-Factory's training on the benchmark's data: `llamafactory-cli train CONFIG.yaml`, with the step clock.

The CLI's train command calls llamafactory.train.tuner.run_exp with the YAML's settings; so does this, passing
bench/peer_runs/step_clock.py's StepClock through run_exp's callbacks argument.

Reads:  CONFIG.yaml (written by bench/peers.py); its dataset_dir holds dataset_info.json and the sharegpt JSON
Writes: output_dir/adapter_model.safetensors (and what LLaMA-Factory saves beside it); the StepClock JSON
Run:    python bench/peer_runs/llamafactory_train.py CONFIG.yaml
"""

import sys
from pathlib import Path

import yaml
from llamafactory.train.tuner import run_exp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_clock import StepClock  # noqa: E402

run_exp(yaml.safe_load(Path(sys.argv[1]).read_text()), callbacks=[StepClock()])
