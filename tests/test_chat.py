"""The contract between training and inference: sizing, messages, labels, batches."""

import numpy as np
import torch
from PIL import Image

from latexocr import chat
from latexocr.data import Sample


def formula_image(width: int, height: int, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, (width, height), "white" if mode == "RGB" else (0, 0, 0, 0))
    ink = (0, 0, 0) if mode == "RGB" else (0, 0, 0, 255)
    for x in range(width // 10, width - width // 10):
        image.putpixel((x, height // 2), ink)
    return image


def test_wide_images_stay_wide_in_whole_28px_blocks():
    # The tutorial trained on 500x100 (h x w) and predicted on 100x500; sizing keeps the aspect ratio instead.
    sized = chat.load_image(formula_image(500, 100), chat.sizing())
    width, height = sized.size
    assert width % 28 == 0 and height % 28 == 0
    assert width > 3 * height
    assert abs(width / height - 5) < 1.0
    assert chat.MIN_PIXELS <= width * height <= chat.MAX_PIXELS


def test_tiny_and_huge_images_are_bounded_by_min_and_max_pixels():
    small = chat.load_image(formula_image(60, 20), chat.sizing())
    large = chat.load_image(formula_image(3000, 600), chat.sizing())
    assert small.size[0] * small.size[1] >= chat.MIN_PIXELS
    assert large.size[0] * large.size[1] <= chat.MAX_PIXELS



def test_inference_reads_the_sizing_training_recorded():
    recorded = {"min_pixels": 32 * 32 * 32, "max_pixels": 512 * 32 * 32, "image_size": "", "family": {"token_px": 32}}
    sizing = chat.recorded_sizing(recorded)
    assert sizing == {"min_pixels": 32 * 32 * 32, "max_pixels": 512 * 32 * 32, "token_px": 32}
    assert chat.load_image(formula_image(500, 100), sizing).size[0] % 32 == 0
    before_families = {"min_pixels": chat.MIN_PIXELS, "max_pixels": chat.MAX_PIXELS, "image_size": "500x100"}
    assert chat.recorded_sizing(before_families) == {"resized_height": 500, "resized_width": 100, "token_px": 28}

def test_a_fixed_size_is_used_exactly_when_given():
    sized = chat.load_image(formula_image(300, 60), chat.sizing(image_size="500x100"))
    assert sized.size == (112, 504)  # width, height: the tutorial's 500 x 100 rounded to 28 px blocks


def test_transparent_images_are_flattened_on_white():
    sized = chat.load_image(formula_image(300, 60, mode="RGBA"), chat.sizing())
    assert sized.mode == "RGB"
    assert sized.getpixel((0, 0)) == (255, 255, 255)
    assert sized.convert("L").getextrema()[0] < 128  # the ink survived


def test_labels_cover_the_answer_and_end_with_im_end(processor):
    answer = r"\frac { a } { b } + x ^ { 2 }"
    example = chat.encode_example(processor, chat.load_image(formula_image(300, 60), chat.sizing()), answer, chat.PROMPT)
    labels, input_ids = example["labels"], example["input_ids"]
    tokenizer = processor.tokenizer
    trained = labels[labels != chat.IGNORE_INDEX]
    assert tokenizer.decode(trained) == answer + "<|im_end|>"
    assert trained[-1].item() == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trained[-1].item() != tokenizer.pad_token_id
    # Everything before the answer is masked: the prompt, the image tokens, the assistant header.
    first = (labels != chat.IGNORE_INDEX).nonzero()[0].item()
    assert tokenizer.decode(input_ids[:first]).endswith("<|im_start|>assistant\n")
    assert (labels[first:] == input_ids[first:]).all()
    image_tokens = (input_ids == processor.image_token_id).sum().item()
    t, h, w = example["image_grid_thw"][0].tolist()
    assert image_tokens == t * h * w // 4
    assert (example["mm_token_type_ids"] == (input_ids == processor.image_token_id).long()).all()


def test_training_prompt_is_exactly_the_inference_prompt(processor):
    image = chat.load_image(formula_image(300, 60), chat.sizing())
    example = chat.encode_example(processor, image, "x", chat.PROMPT)
    generation = chat.encode_prompts(processor, [image], chat.PROMPT)
    prompt_ids = generation["input_ids"][0]
    assert torch.equal(example["input_ids"][:len(prompt_ids)], prompt_ids)
    assert torch.equal(example["pixel_values"], generation["pixel_values"])


def test_collator_batches_images_of_different_sizes(processor, tiny_model_dir, tmp_path):
    sizes = [(300, 60), (120, 90), (700, 40)]
    samples = []
    for i, size in enumerate(sizes):
        path = tmp_path / f"{i}.png"
        formula_image(*size).save(path)
        samples.append(Sample(str(i), path, "x ^ { %d }" % i))
    collator = chat.TrainCollator(processor, chat.PROMPT, chat.sizing())
    batch = collator(samples)
    grids = batch["image_grid_thw"]
    assert grids.shape == (3, 3) and len({tuple(g.tolist()) for g in grids}) == 3
    assert batch["pixel_values"].shape[0] == grids.prod(dim=1).sum().item()
    lengths = batch["attention_mask"].sum(dim=1)
    assert batch["input_ids"].shape == (3, lengths.max().item())
    for row, length in enumerate(lengths.tolist()):  # right padding: labels and attention stop at the padding
        assert (batch["labels"][row, length:] == chat.IGNORE_INDEX).all()
        assert (batch["input_ids"][row, length:] == processor.tokenizer.pad_token_id).all()
        assert batch["labels"][row, length - 1].item() == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 0


def test_image_tokens_counted_from_the_size_match_the_processor(processor):
    for size, image_sizing in [((300, 60), chat.sizing()), ((1500, 90), chat.sizing()), ((40, 20), chat.sizing()),
                               ((300, 60), chat.sizing(image_size="500x100"))]:
        example = chat.encode_example(processor, chat.load_image(formula_image(*size), image_sizing), "x",
                                      chat.PROMPT)
        counted = (example["input_ids"] == processor.image_token_id).sum().item()
        assert chat.image_tokens(*size, image_sizing) == counted, size


def test_unusual_image_modes_become_black_on_white_rgb():
    base = formula_image(200, 40).convert("L")
    variants = {
        "CMYK": base.convert("CMYK"),
        "P": base.convert("P"),
        "I;16": Image.fromarray(np.asarray(base).astype(np.uint16) * 257),
        "LA": Image.merge("LA", (base, Image.new("L", base.size, 255))),
        "transparent P": formula_image(200, 40, mode="RGBA").convert("P"),
    }
    for name, image in variants.items():
        sized = chat.load_image(image, chat.sizing())
        low, high = sized.convert("L").getextrema()
        assert sized.mode == "RGB" and low < 100 and high > 200, name
        assert sized.getpixel((0, 0))[0] > 200, name  # white paper, whatever the mode
