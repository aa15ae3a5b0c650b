"""Unsloth on the benchmark's data, the way its Qwen2-VL notebooks train: FastVisionModel in 16 bit, LoRA on the
language layers, TRL's SFTTrainer fed by UnslothVisionDataCollator with the loss on the responses only.

Reads:  --config CONFIG.yaml (TRL's ScriptArguments, SFTConfig and ModelConfig, written by bench/peers.py);
        dataset_name is a folder holding train.jsonl, one {"images": [path], "messages": [user, assistant]} per line
Writes: output_dir/adapter_model.safetensors (model.save_pretrained); the StepClock JSON
Run:    python bench/peer_runs/unsloth_sft.py --config CONFIG.yaml
"""

import json
import sys
from pathlib import Path

from unsloth import FastVisionModel  # first: Unsloth patches transformers, peft and TRL as it is imported
from unsloth.trainer import UnslothVisionDataCollator

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_clock import StepClock  # noqa: E402

parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig))
script_args, training_args, model_args = parser.parse_args_and_config()

# 16 bit, not Unsloth's default 4 bit (another model, and slower); no checkpointing (its default is its own)
model, processor = FastVisionModel.from_pretrained(model_args.model_name_or_path,
                                                   dtype=getattr(torch, model_args.dtype), load_in_4bit=False,
                                                   use_gradient_checkpointing=False,
                                                   max_seq_length=training_args.max_length)
model = FastVisionModel.get_peft_model(model, finetune_vision_layers=False, finetune_language_layers=True,
                                       finetune_attention_modules=True, finetune_mlp_modules=True,
                                       target_modules=model_args.lora_target_modules, r=model_args.lora_r,
                                       lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                                       bias="none", random_state=training_args.seed, use_gradient_checkpointing=False)
FastVisionModel.for_training(model)

# Unsloth's notebooks hand the trainer a list of conversations with the PIL image inside the user turn.
conversations = []
for line in (Path(script_args.dataset_name) / "train.jsonl").read_text().splitlines():
    record = json.loads(line)
    user, assistant = record["messages"]
    content = [dict(part, image=Image.open(record["images"][0])) if part["type"] == "image" else part
               for part in user["content"]]
    conversations.append({"messages": [dict(user, content=content), assistant]})

# The trainer must leave the conversations to the collator: no text field, no preparation, no column pruning.
training_args.remove_unused_columns = False
training_args.dataset_text_field = ""
training_args.dataset_kwargs = {"skip_prepare_dataset": True}
collator = UnslothVisionDataCollator(model, processor, resize="max", train_on_responses_only=True,
                                     instruction_part="<|im_start|>user\n", response_part="<|im_start|>assistant\n")
trainer = SFTTrainer(model=model, processing_class=processor, data_collator=collator, args=training_args,
                     train_dataset=conversations, callbacks=[StepClock()])
trainer.train()
model.save_pretrained(training_args.output_dir)
