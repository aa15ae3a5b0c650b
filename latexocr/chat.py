"""What training and inference must agree on: the prompt, the image sizing, the chat messages, the labels.

Both train.py and infer.py build their inputs here, so an image is never sized one way for training
and another way for prediction.
"""

from pathlib import Path

import torch
from PIL import Image
from qwen_vl_utils import fetch_image, smart_resize
from qwen_vl_utils.vision_process import SPATIAL_MERGE_SIZE

from latexocr.data import open_image

PROMPT = "Write the formula in this image as LaTeX."
# Qwen2-VL and Qwen2.5-VL turn every 28x28 px block into one image token, Qwen3-VL every 32x32 px block
# (families.py). Formulas are wide and short: the bounds keep the aspect ratio, lift tiny crops to at
# least 32 tokens and cap large ones at 512 tokens.
MIN_IMAGE_TOKENS = 32
MAX_IMAGE_TOKENS = 512
TOKEN_PX = 28  # px per side of one image token, Qwen2-VL's: the default below
MIN_PIXELS = MIN_IMAGE_TOKENS * TOKEN_PX * TOKEN_PX
MAX_PIXELS = MAX_IMAGE_TOKENS * TOKEN_PX * TOKEN_PX
IGNORE_INDEX = -100  # label value the loss skips
END_OF_ANSWER = "<|im_end|>"
END_TOKENS = (END_OF_ANSWER, "<|endoftext|>")  # generation stops at either
# Images reach the processor already sized by load_image, and its own bounds must not resize them again:
# Qwen3-VL's lifts every image to at least 64 tokens, so image_tokens' count would no longer hold.
PROCESSOR_KWARGS = {"do_resize": False, "return_tensors": "pt"}


def sizing(min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS, image_size: str = "",
           token_px: int = TOKEN_PX) -> dict:
    """How images are sized: aspect kept within [min_pixels, max_pixels], or exactly image_size ("HxW" px),
    in whole blocks of token_px x token_px px (one image token each; the family's, see families.py)."""
    if not image_size:
        if not 0 < min_pixels <= max_pixels:
            raise SystemExit(f"min_pixels={min_pixels}, max_pixels={max_pixels}: need 0 < min_pixels <= max_pixels.")
        return {"min_pixels": min_pixels, "max_pixels": max_pixels, "token_px": token_px}
    try:
        height, width = (int(v) for v in image_size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"image_size={image_size!r}: expected HEIGHTxWIDTH in px, e.g. 100x500.") from None
    return {"resized_height": height, "resized_width": width, "token_px": token_px}



def recorded_sizing(train_config: dict) -> dict:
    """The image sizing a training run used, from its train_config.json (for infer.py and export.py).

    A config written before other families were supported has no family: it was Qwen2-VL's 28 px tokens."""
    token_px = train_config.get("family", {}).get("token_px", TOKEN_PX)
    return sizing(train_config["min_pixels"], train_config["max_pixels"], train_config["image_size"], token_px)

def image_tokens(width: int, height: int, image_sizing: dict) -> int:
    """Image tokens an image of this size becomes, without decoding it (for checking lengths up front).

    Either size will do for an image that open_image turns a quarter (EXIF orientation): the count is the same."""
    token_px = image_sizing["token_px"]
    if "resized_height" in image_sizing:
        height, width = smart_resize(image_sizing["resized_height"], image_sizing["resized_width"], factor=token_px)
    else:
        height, width = smart_resize(height, width, factor=token_px, min_pixels=image_sizing["min_pixels"],
                                     max_pixels=image_sizing["max_pixels"])
    return (height // token_px) * (width // token_px)


def load_image(path: str | Path | Image.Image, image_sizing: dict) -> Image.Image:
    """Open an image as data.open_image does (upright, RGB on white) and resize it to whole image-token blocks."""
    patch_px = image_sizing["token_px"] // SPATIAL_MERGE_SIZE  # qwen_vl_utils multiplies it back by the merge size
    return fetch_image({"image": open_image(path), **image_sizing}, image_patch_size=patch_px)


def messages(prompt: str) -> list[dict]:
    """One user turn: the image, then the instruction."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def prompt_text(processor, prompt: str) -> str:
    """The chat-formatted prompt up to and including the assistant header."""
    return processor.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)


def encode_example(processor, image: Image.Image, answer: str, prompt: str) -> dict[str, torch.Tensor]:
    """Tokens of prompt + answer + <|im_end|>, with labels only on the answer and the end token."""
    inputs = processor(text=[prompt_text(processor, prompt)], images=[image], **PROCESSOR_KWARGS)
    tokenizer = processor.tokenizer
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    answer_ids = torch.tensor(answer_ids + [tokenizer.convert_tokens_to_ids(END_OF_ANSWER)])
    prompt_ids = inputs["input_ids"][0]
    return {
        "input_ids": torch.cat([prompt_ids, answer_ids]),
        "attention_mask": torch.ones(len(prompt_ids) + len(answer_ids), dtype=torch.long),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
        "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"][0], torch.zeros_like(answer_ids)]),
        "pixel_values": inputs["pixel_values"],
        "image_grid_thw": inputs["image_grid_thw"],
    }


def pad_examples(examples: list[dict[str, torch.Tensor]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token sequences; images of any size are concatenated patch lists, as Qwen2-VL expects."""
    length = max(len(e["input_ids"]) for e in examples)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
    batch = {key: torch.full((len(examples), length), value, dtype=torch.long) for key, value in fill.items()}
    for row, example in enumerate(examples):
        for key in fill:
            batch[key][row, :len(example[key])] = example[key]
    batch["pixel_values"] = torch.cat([e["pixel_values"] for e in examples])
    batch["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in examples])
    return batch


class TrainCollator:
    """Turns samples (image path + LaTeX) into a training batch, opening and sizing images on the fly.

    It runs in the DataLoader's worker processes, so nothing but paths and text is ever cached.
    """

    def __init__(self, processor, prompt: str, image_sizing: dict):
        self.processor, self.prompt, self.image_sizing = processor, prompt, image_sizing

    def __call__(self, samples) -> dict[str, torch.Tensor]:
        return self.pad(self.encode(samples))

    def encode(self, samples) -> list[dict[str, torch.Tensor]]:
        return [encode_example(self.processor, load_image(s.image, self.image_sizing), s.text, self.prompt)
                for s in samples]

    def pad(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return pad_examples(examples, self.processor.tokenizer.pad_token_id)


def encode_prompts(processor, images: list[Image.Image], prompt: str):
    """A left-padded batch of prompts for generation (the new tokens then line up at the right)."""
    text = [prompt_text(processor, prompt)] * len(images)
    return processor(text=text, images=images, padding=True, padding_side="left", **PROCESSOR_KWARGS)


def rope_positions(batch: dict[str, torch.Tensor], merge_size: int) -> torch.Tensor:
    """The multimodal rotary positions (3, batch, length) the model would compute for a batch of pad_examples,
    computed here on the CPU: the model's own computation reads its inputs back from the GPU, row by row.

    Each sample is text, one image, text, then right padding (position 0, as the model leaves it). Text counts
    up by one; the image's tokens share the temporal position where it starts and spread over rows and
    columns from there; the text after it resumes at the start plus the image's longer side in tokens."""
    input_ids, types = batch["input_ids"], batch["mm_token_type_ids"]
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    for row, (_, height, width) in enumerate(batch["image_grid_thw"].tolist()):
        length = int(batch["attention_mask"][row].sum())
        start = int(types[row, :length].argmax())  # the first image token
        rows, columns = height // merge_size, width // merge_size
        end = start + rows * columns
        positions[:, row, :start] = torch.arange(start)
        positions[0, row, start:end] = start
        positions[1, row, start:end] = start + torch.arange(rows).repeat_interleave(columns)
        positions[2, row, start:end] = start + torch.arange(columns).repeat(rows)
        positions[:, row, end:length] = start + max(rows, columns) + torch.arange(length - end)
    return positions
