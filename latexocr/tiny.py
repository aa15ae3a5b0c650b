"""A tiny random Qwen2-VL built locally, for running the whole pipeline offline on a CPU.

It has Qwen2-VL's architecture, special tokens and chat template, a small byte-level BPE tokenizer
trained here on synthetic formulas, and random weights. `build_model_folder` writes it like a
downloaded model (config, safetensors, processor), so every script loads it the same way.
The same builder makes the full-size Qwen2-VL-2B shape (random weights) for speed measurements.
"""

import json
import random
import shutil
import tempfile
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor,
                          Qwen2VLProcessor, Qwen2VLVideoProcessor)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from latexocr import chat, synth

# Qwen2-VL's own special tokens, in its order.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-Instruct's chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Small enough to train in seconds on a CPU, big enough to memorise a handful of formulas.
TINY_DIMENSIONS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, mrope_section=[2, 3, 3], vision_depth=2, vision_embed_dim=64,
                       vision_num_heads=4, vocab_size=8000)
# Qwen2-VL-2B-Instruct's shape (the vocabulary is padded to it; the tokenizer stays small).
QWEN2_VL_2B_DIMENSIONS = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24],
                              vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vocab_size=151936)
TOKENIZER_VOCAB_SIZE = 8000


def train_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer and special tokens, and Qwen2-VL's chat template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=bpe.get_vocab(), merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               unk_token=None, extra_special_tokens=SPECIAL_TOKENS[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)


def build_config(tokenizer: Qwen2Tokenizer, dims: dict) -> Qwen2VLConfig:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = max(dims["vocab_size"], len(tokenizer))
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    assert sum(dims["mrope_section"]) * 2 == head_dim, "mrope_section must split half the head dimension"
    return Qwen2VLConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=dims["hidden_size"],
                         intermediate_size=dims["intermediate_size"],
                         num_hidden_layers=dims["num_hidden_layers"],
                         num_attention_heads=dims["num_attention_heads"],
                         num_key_value_heads=dims["num_key_value_heads"], max_position_embeddings=32768,
                         rms_norm_eps=1e-6, tie_word_embeddings=True,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                              mrope_section=dims["mrope_section"]),
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=dims["vision_depth"], embed_dim=dims["vision_embed_dim"],
                           num_heads=dims["vision_num_heads"], hidden_size=dims["hidden_size"], mlp_ratio=4,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)


def build_model(config: Qwen2VLConfig, dtype: torch.dtype = torch.float32, device: str = "cpu",
                seed: int = 0) -> Qwen2VLForConditionalGeneration:
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model


def build_model_folder(out_dir: str | Path, dims: dict = TINY_DIMENSIONS, seed: int = 0,
                       dtype: torch.dtype = torch.float32, device: str = "cpu") -> Path:
    """Write a random Qwen2-VL (config, safetensors, processor) to out_dir, atomically.

    The full-size shape is built fastest on a GPU in bf16 (dtype=torch.bfloat16, device="cuda")."""
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    corpus = [synth.random_formula(rng) for _ in range(3000)]
    corpus += ["You are a helpful assistant.", "system\nuser\nassistant\n", chat.PROMPT]
    tokenizer = train_tokenizer(corpus)
    model = build_model(build_config(tokenizer, dims), dtype=dtype, device=device, seed=seed)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        model.save_pretrained(tmp)
        build_processor(tokenizer).save_pretrained(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
