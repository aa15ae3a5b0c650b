"""TRL's SFTTrainer on the benchmark's data, run the way TRL's examples/scripts/sft_vlm.py runs a vision model.

Reads:  --config CONFIG.yaml (TRL's ScriptArguments, SFTConfig and ModelConfig in one file, written by
        bench/peers.py); dataset_name is a folder holding train.jsonl, one {"images": [path], "prompt": [user turn],
        "completion": [assistant turn]} per line (TRL's prompt-completion format: the loss is on the completion)
Writes: output_dir/adapter_model.safetensors (and what trainer.save_model writes beside it); the StepClock JSON
Run:    python bench/peer_runs/trl_sft.py --config CONFIG.yaml
"""

import sys
from pathlib import Path

import torch
from datasets import Image, Sequence, load_dataset
from transformers import AutoModelForImageTextToText
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_peft_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_clock import StepClock  # noqa: E402

parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
script_args, training_args, model_args = parser.parse_args_and_config()

model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, dtype=getattr(
    torch, model_args.dtype), attn_implementation=model_args.attn_implementation)
# The images column holds paths: cast, it decodes them to PIL images as the collator asks for them.
dataset = load_dataset(script_args.dataset_name, split=script_args.dataset_train_split)
dataset = dataset.cast_column("images", Sequence(Image()))
trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, peft_config=get_peft_config(model_args),
                     callbacks=[StepClock()])
trainer.train()
trainer.save_model(training_args.output_dir)
