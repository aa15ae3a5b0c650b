"""The SwanLab team's public Qwen2-VL LaTeX OCR tutorial recipe, reproduced as the baseline for train.py.

Its preprocessing (`Dataset.from_json(...).map(process_func)`, every tensor stored as Python lists), its
labels (prompt masked, answer, then the pad token), its image sizes (500 high x 100 wide for training,
100 x 500 for prediction), its LoRA and Trainer settings and its one-image-at-a-time predict loop are kept
as the tutorial wrote them. What differs, and why:

1. transformers 5 needs `mm_token_type_ids` (0 text, 1 image) whenever pixel values reach the model, and
   `tokenizer.pad` leaves it ragged: process_func extends the processor's row with zeros over the answer
   and end token (truncated with the rest), and `TutorialCollator` right- or left-pads it with 0 around the
   tutorial's `DataCollatorForSeq2Seq`. Nothing else about batching needed changing: every image has the
   same size, so `tokenizer.pad` stacks `pixel_values` to (batch, patches, 1176) and `image_grid_thw` to
   (batch, 3); Qwen2-VL's patch embedding flattens the former with `view(-1, ...)`, so the vision tower
   sees the (total patches, 1176) it expects. Images of different sizes in one batch would fail there.
2. `processor.tokenizer` replaces a second `AutoTokenizer(use_fast=False, trust_remote_code=True)`:
   transformers 5 ignores `use_fast=False`, so both are the same tokenizer.
3. Image paths in the JSON are resolved relative to the JSON file (the tutorial's were relative to the
   working directory).
4. The model goes to the one GPU with `.to(device)` (the tutorial's `device_map="auto"` does the same
   on one GPU), without `trust_remote_code`, and `dtype=` replaces the deprecated `torch_dtype=`.
   On a CPU it loads in fp32, without gradient checkpointing, with `use_cpu=True`.
5. For measuring: `logging_steps=1` so every optimizer step's loss is recorded (the tutorial printed every
   10th), `save_strategy="no"` (no checkpoint writing inside the timed run), `max_steps` and `seed`
   (also set before LoRA's random init), no SwanLab callback, and the `.map` cache in a fresh folder under
   output_dir, deleted afterwards, so each run preprocesses cold.
6. The prompt, the answer's end token (the tutorial's pad token, or `<|im_end|>`), the image sizes and the
   LoRA dropout are parameters whose defaults are the tutorial's, so a run can be set up to match
   train.py's inputs (dropout 0 takes the random masks out of a loss-by-loss comparison).
7. predict_tutorial takes `max_new_tokens` (the tutorial's 8192 lets an untrained model run for minutes
   per image), puts the model in eval mode (the tutorial's model was loaded for inference) and moves the
   inputs to the model's device instead of "cuda".
"""

import gc
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, TaskType, get_peft_model
from qwen_vl_utils import process_vision_info
from transformers import (AutoProcessor, DataCollatorForSeq2Seq, Qwen2VLForConditionalGeneration, Trainer,
                          TrainerCallback, TrainingArguments, set_seed)

from latexocr.data import resolve_from_file

TUTORIAL_PROMPT = "你是一个LaText OCR助手,目标是读取用户输入的照片，转换成LaTex公式。"
MAX_LENGTH = 8192  # tokens per example; longer ones are cut
BATCH_SIZE = 4  # samples per micro-batch
GRADIENT_ACCUMULATION_STEPS = 4  # micro-batches per optimizer step


def end_token_id(tokenizer, end_token: str) -> int:
    """The token after the answer: the tutorial's pad token, or the <|im_end|> that ends every chat turn."""
    if end_token == "pad":
        return tokenizer.pad_token_id
    if end_token == "im_end":
        return tokenizer.convert_tokens_to_ids("<|im_end|>")
    raise ValueError(f"end_token={end_token!r}: expected 'pad' (the tutorial's) or 'im_end'")


def process_func(example: dict, processor, json_path: str | Path, prompt: str = TUTORIAL_PROMPT,
                 end_token: str = "pad", resized_height: int = 500, resized_width: int = 100) -> dict:
    """The tutorial's per-example preprocessing, plus the mm_token_type_ids transformers 5 needs."""
    conversation = example["conversations"]
    image_file_path = str(resolve_from_file(conversation[0]["value"], Path(json_path)))
    output_content = conversation[1]["value"]
    messages = [{"role": "user", "content": [
        {"type": "image", "image": image_file_path, "resized_height": resized_height, "resized_width": resized_width},
        {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image_inputs, video_inputs = process_vision_info(messages)
    inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True, return_tensors="pt")
    instruction = {key: value.tolist() for key, value in inputs.items()}
    tokenizer = processor.tokenizer
    response = tokenizer(output_content, add_special_tokens=False)
    end_id = end_token_id(tokenizer, end_token)

    input_ids = instruction["input_ids"][0] + response["input_ids"] + [end_id]
    attention_mask = instruction["attention_mask"][0] + response["attention_mask"] + [1]
    labels = [-100] * len(instruction["input_ids"][0]) + response["input_ids"] + [end_id]
    mm_token_type_ids = instruction["mm_token_type_ids"][0] + [0] * (len(response["input_ids"]) + 1)
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
        mm_token_type_ids = mm_token_type_ids[:MAX_LENGTH]
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(attention_mask),
            "labels": torch.tensor(labels), "mm_token_type_ids": torch.tensor(mm_token_type_ids),
            "pixel_values": torch.tensor(instruction["pixel_values"]),
            "image_grid_thw": torch.tensor(instruction["image_grid_thw"]).squeeze(0)}


class TutorialCollator:
    """The tutorial's DataCollatorForSeq2Seq, with mm_token_type_ids padded beside it.

    It also notes what each batch it builds holds, for counting tokens and image patches afterwards.
    """

    def __init__(self, tokenizer):
        self.seq2seq = DataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True)
        self.padding_side = tokenizer.padding_side
        self.batches = []  # per batch built: dict(samples, tokens, padded_tokens, image_patches)

    def __call__(self, features: list[dict]) -> dict:
        token_types = [feature["mm_token_type_ids"] for feature in features]
        batch = self.seq2seq([{k: v for k, v in feature.items() if k != "mm_token_type_ids"} for feature in features])
        length = batch["input_ids"].shape[1]
        if self.padding_side == "right":
            rows = [row + [0] * (length - len(row)) for row in token_types]
        else:
            rows = [[0] * (length - len(row)) + row for row in token_types]
        batch["mm_token_type_ids"] = torch.tensor(rows)
        self.batches.append({
            "samples": len(features),
            "tokens": sum(sum(feature["attention_mask"]) for feature in features),
            "padded_tokens": len(features) * length,
            "image_patches": sum(t * h * w for t, h, w in (feature["image_grid_thw"] for feature in features)),
        })
        return batch


class LossRecorder(TrainerCallback):
    """Every logged training loss and gradient norm, in step order."""

    def __init__(self):
        self.losses, self.grad_norms, self.step_ends = [], [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.step_ends.append(time.perf_counter())

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            self.grad_norms.append(float(logs.get("grad_norm", float("nan"))))


def train_tutorial(model_dir: str | Path, train_json: str | Path, output_dir: str | Path, max_steps: int = -1,
                   seed: int = 42, prompt: str = TUTORIAL_PROMPT, end_token: str = "pad", resized_height: int = 500,
                   resized_width: int = 100, lora_dropout: float = 0.05, device: str | None = None) -> dict:
    """Run the tutorial's preprocessing and training; return timings, losses, memory and what was trained on.

    samples, tokens, padded_tokens and image_patches count the micro-batches that reached the model, not
    those a DataLoader may have built ahead. samples is steps x 16 except where an epoch ends in a partial
    step: 996 samples are 249 micro-batches, 62 steps of 4 and one of 1, so 2 epochs are 126 steps of
    1992 samples. tokens are the non-padding tokens (sum of attention masks); padded_tokens include the padding.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    if on_gpu and torch.cuda.device_count() > 1:
        raise RuntimeError(f"{torch.cuda.device_count()} GPUs are visible, and the Trainer would split each batch "
                           "over all of them; the tutorial recipe is measured on one. Set CUDA_VISIBLE_DEVICES=0.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    set_seed(seed)
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.bfloat16 if on_gpu else torch.float32).to(device)
    model.enable_input_require_grads()

    cache_dir = Path(tempfile.mkdtemp(dir=output_dir, prefix="datasets_cache_"))
    try:
        train_ds = Dataset.from_json(str(train_json), cache_dir=str(cache_dir))
        start = time.perf_counter()
        train_dataset = train_ds.map(process_func, fn_kwargs=dict(
            processor=processor, json_path=Path(train_json).resolve(), prompt=prompt, end_token=end_token,
            resized_height=resized_height, resized_width=resized_width))
        preprocess_s = time.perf_counter() - start

        config = LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            inference_mode=False, r=64, lora_alpha=16, lora_dropout=lora_dropout, bias="none")
        peft_model = get_peft_model(model, config)
        args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=BATCH_SIZE,
                                 gradient_accumulation_steps=GRADIENT_ACCUMULATION_STEPS, logging_steps=1,
                                 logging_first_step=True, num_train_epochs=2, max_steps=max_steps,
                                 save_strategy="no", learning_rate=1e-4, save_on_each_node=True,
                                 gradient_checkpointing=on_gpu, report_to="none", seed=seed, use_cpu=not on_gpu)
        collator = TutorialCollator(processor.tokenizer)
        recorder = LossRecorder()
        trainer = Trainer(model=peft_model, args=args, train_dataset=train_dataset, data_collator=collator,
                          callbacks=[recorder])
        forwards = []  # one entry per micro-batch the model ran on
        hook = peft_model.get_base_model().register_forward_pre_hook(lambda module, inputs: forwards.append(1))
        start = time.perf_counter()
        trainer.train()
        if on_gpu:
            torch.cuda.synchronize()
        train_s = time.perf_counter() - start
        hook.remove()
        steps = trainer.state.global_step
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    trained = collator.batches[:len(forwards)]
    samples = sum(b["samples"] for b in trained)
    result = {
        "preprocess_s": preprocess_s,
        "train_s": train_s,
        "steps": steps,
        "samples": samples,
        "samples_per_s": samples / train_s,
        # Leaves out the first step (workers starting, kernels warming up), as train.py's own number does.
        "steady_samples_per_s": ((len(recorder.step_ends) - 1) * BATCH_SIZE * GRADIENT_ACCUMULATION_STEPS
                                 / (recorder.step_ends[-1] - recorder.step_ends[0])
                                 if len(recorder.step_ends) > 1 else float("nan")),
        "losses": recorder.losses,
        "grad_norms": recorder.grad_norms,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30 if on_gpu else 0.0,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if on_gpu else 0.0,
        "tokens": sum(b["tokens"] for b in trained),
        "padded_tokens": sum(b["padded_tokens"] for b in trained),
        "image_patches": sum(b["image_patches"] for b in trained),
        "train_examples": len(train_dataset),
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "versions": {name: version(name) for name in ("torch", "transformers", "peft", "accelerate", "datasets",
                                                       "qwen-vl-utils")},
        "settings": {"prompt": prompt, "end_token": end_token, "resized_height": resized_height,
                     "resized_width": resized_width, "lora_dropout": lora_dropout, "max_steps": max_steps, "seed": seed,
                     "batch_size": BATCH_SIZE, "gradient_accumulation_steps": GRADIENT_ACCUMULATION_STEPS},
    }
    del trainer, peft_model, model
    gc.collect()
    if on_gpu:
        torch.cuda.empty_cache()
    return result


def predict_tutorial(model, processor, image_paths: list[str | Path], prompt: str = TUTORIAL_PROMPT,
                     max_new_tokens: int = 256, resized_height: int = 100, resized_width: int = 500) -> list[str]:
    """The tutorial's predict loop: one image at a time, sized 100 x 500, decoded without special tokens."""
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for image_path in image_paths:
        messages = [{"role": "user", "content": [
            {"type": "image", "image": str(image_path), "resized_height": resized_height,
             "resized_width": resized_width},
            {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        image_inputs, video_inputs = process_vision_info(messages)
        inputs = processor(text=[text], images=image_inputs, videos=video_inputs, padding=True,
                           return_tensors="pt").to(device)
        generated_ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
        generated_ids_trimmed = [out_ids[len(in_ids):] for in_ids, out_ids in zip(inputs.input_ids, generated_ids)]
        output_text = processor.batch_decode(generated_ids_trimmed, skip_special_tokens=True,
                                             clean_up_tokenization_spaces=False)
        predictions.append(output_text[0])
    return predictions
