"""Generation with a static KV cache (compile_generation): the predictions of eager generate, whatever the batch.

On a CPU the static cache runs eagerly, the path the GPU compiles; a counting torch.compile backend checks that
the batches compile only for the shapes the cache's buckets promise. The compiled CUDA graphs themselves are
checked on a GPU (python -m pytest -q -m gpu tests/test_generation.py)."""

import copy
import itertools

import pytest
import torch
from transformers import CompileConfig

from latexocr import chat, modeling
from latexocr.synth import synthetic_samples

SETTINGS = dict(prompt=chat.PROMPT, image_sizing=chat.sizing(), max_new_tokens=16, show_progress=False)


def opinionated(model):
    """Larger random weights (as tests/test_predict.py's), so that different images get different outputs."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.15, generator=generator)
    return model


@pytest.fixture(scope="module")
def model_and_processor(tiny_model_dir):
    model, processor = modeling.load_base_model(tiny_model_dir, "cpu")
    return opinionated(model), processor


def formula_images(n: int, seed: int, wide: tuple[int, ...] = ()) -> list:
    """n synthetic formula images; those at the positions in `wide` stretched to 1200 x 160 px (245 image tokens),
    so that their prompts fall in a longer bucket than the others' (about 80 tokens)."""
    images = [image for image, _ in itertools.islice(synthetic_samples(n, seed=seed), n)]
    return [image.resize((1200, 160)) if i in wide else image for i, image in enumerate(images)]


def prompt_lengths(processor, images: list, batch_size: int) -> list[int]:
    """The left-padded prompt length of each batch predict() forms."""
    return [chat.encode_prompts(processor, [chat.load_image(image, chat.sizing()) for image in
                                            images[start:start + batch_size]], chat.PROMPT)["input_ids"].shape[1]
            for start in range(0, len(images), batch_size)]


def test_the_static_cache_predicts_what_eager_generate_does(model_and_processor):
    model, processor = model_and_processor
    images = formula_images(7, seed=5, wide=(4,))
    assert len({image.size for image in images}) > 3  # prompts of different lengths: left padding is exercised
    lengths = prompt_lengths(processor, images, 3)  # 3 + 3 + a last batch of 1, padded to 3
    assert len({modeling.static_cache_length(n, 16) for n in lengths}) == 2  # two cache lengths
    eager = modeling.predict(model, processor, images, batch_size=3, **SETTINGS)
    static = modeling.predict(model, processor, images, batch_size=3, compile_generation=True, **SETTINGS)
    assert static == eager
    assert len(set(eager)) > 3  # the outputs depend on the image, so equality means something


def test_a_static_cache_prediction_depends_on_neither_the_batch_size_nor_the_place_in_it(model_and_processor):
    model, processor = model_and_processor
    images = formula_images(5, seed=7, wide=(1,))
    alone = [modeling.predict(model, processor, [image], batch_size=1, **SETTINGS)[0] for image in images]
    assert len(set(alone)) > 2
    for batch_size in (1, 2, 4):  # 4: a last batch of one image, padded with three copies of it
        assert modeling.predict(model, processor, images, batch_size=batch_size, compile_generation=True,
                                **SETTINGS) == alone
    reversed_order = modeling.predict(model, processor, images[::-1], batch_size=3, compile_generation=True,
                                      **SETTINGS)
    assert reversed_order == alone[::-1]


def test_the_cache_length_buckets_bound_the_shapes():
    multiple = modeling.CACHE_LENGTH_MULTIPLE
    assert modeling.static_cache_length(1, 256) == modeling.static_cache_length(multiple, 256) == multiple + 256
    assert modeling.static_cache_length(multiple + 1, 256) == 2 * multiple + 256
    # Every prompt up to 640 tokens (Qwen2-VL's longest at 512 image tokens are about 540) in 5 lengths
    assert len({modeling.static_cache_length(n, 256) for n in range(1, 641)}) == 5
    # A shorter prompt after a longer one reuses the longer cache: a shape is new only when the cache grows
    shapes = modeling.decode_shapes([70, 300, 80, 130, 700, 20], 64, 256)
    assert shapes == [(64, multiple + 256), (64, 3 * multiple + 256), (64, 6 * multiple + 256)]
    assert modeling.decode_shapes([600, 70, 300], 1, 256) == [(1, 5 * multiple + 256)]


def test_batches_compile_once_per_shape_the_buckets_promise(tiny_model_dir, monkeypatch):
    """torch.compile on the CPU with a backend that counts the graphs it is given and runs them eagerly."""
    model, processor = modeling.load_base_model(tiny_model_dir, "cpu")  # its own: no longer cache from other tests
    model = opinionated(model)
    graphs = []

    def counting_backend(graph, example_inputs):
        graphs.append(graph)
        return graph.forward

    def counting_config(device):
        config = CompileConfig(backend=counting_backend, mode=None, dynamic=False)
        config._compile_all_devices = True  # transformers compiles on a GPU only, unless told
        return config
    monkeypatch.setattr(modeling, "decode_compile_config", counting_config)
    images = formula_images(10, seed=3, wide=(3, 4))  # batches of 3: short, long, short, and a last one of 1
    lengths = prompt_lengths(processor, images, 3)
    shapes = modeling.decode_shapes(lengths, 3, SETTINGS["max_new_tokens"])
    assert len(lengths) == 4 and len(shapes) == 2
    torch.compiler.reset()
    try:
        compiled = modeling.predict(model, processor, images, batch_size=3, compile_generation=True, **SETTINGS)
    finally:
        torch.compiler.reset()
    assert len(graphs) == len(shapes)
    assert compiled == modeling.predict(model, processor, images, batch_size=3, **SETTINGS)


def test_the_setting_compiles_on_a_gpu_when_auto():
    bf16, fp32 = torch.bfloat16, torch.float32
    many, few = modeling.COMPILE_PAYS_FROM, modeling.COMPILE_PAYS_FROM - 1
    assert modeling.compiles_generation("auto", "cuda", bf16, many)
    assert modeling.compiles_generation("auto", "cuda:1", bf16, many)
    assert not modeling.compiles_generation("auto", "cuda", bf16, few)  # eager finishes first: the compiling costs more
    assert not modeling.compiles_generation("auto", "cpu", bf16, many)
    assert not modeling.compiles_generation("auto", "cuda", fp32, many)  # where compiling did not pay
    assert modeling.compiles_generation("true", "cpu", fp32, 1) and not modeling.compiles_generation("false", "cuda",
                                                                                                    bf16, many)


def test_a_loaded_run_compiles_by_its_setting_and_the_number_of_images(model_and_processor):
    from latexocr.predictor import Predictor
    model, processor = model_and_processor
    run = dict(model=model, processor=processor, prompt=chat.PROMPT, image_sizing=chat.sizing(), description="",
               train_config={})
    assert not Predictor(**run, compile_setting="auto").compiles(modeling.COMPILE_PAYS_FROM)  # fp32, on a CPU
    assert Predictor(**run, compile_setting="true").compiles(1)
    assert not Predictor(**run, compile_setting="false").compiles(modeling.COMPILE_PAYS_FROM)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_generation_on_a_gpu_predicts_what_eager_generate_does_in_float32(model_and_processor):
    model, processor = model_and_processor
    model = model.to("cuda")
    images = formula_images(7, seed=5, wide=(4,))
    try:
        torch.compiler.reset()
        eager = modeling.predict(model, processor, images, batch_size=3, **SETTINGS)
        compiled = modeling.predict(model, processor, images, batch_size=3, compile_generation=True, **SETTINGS)
        again = modeling.predict(model, processor, images, batch_size=3, compile_generation=True, **SETTINGS)
    finally:
        torch.compiler.reset()
        model.to("cpu")
    assert compiled == again == eager
    assert len(set(eager)) > 3


def test_the_next_batch_is_encoded_ahead_and_a_bad_image_fails_at_its_batch(model_and_processor, tmp_path):
    _, processor = model_and_processor
    images = formula_images(5, seed=7)
    batches = modeling.encoded_batches(processor, images, chat.PROMPT, chat.sizing(), 2, rows=2)
    ahead = [(size, inputs["input_ids"].tolist()) for size, inputs in batches]
    one_by_one = [chat.encode_prompts(processor, [chat.load_image(x, chat.sizing()) for x in images[i:i + 2]],
                                      chat.PROMPT) for i in (0, 2)]
    assert [size for size, _ in ahead] == [2, 2, 1]
    assert [ids for _, ids in ahead[:2]] == [inputs["input_ids"].tolist() for inputs in one_by_one]
    assert ahead[2][1][0] == ahead[2][1][1]  # the last batch padded to its rows with a copy of its last image

    missing = tmp_path / "missing.png"
    batches = modeling.encoded_batches(processor, [*images[:2], missing], chat.PROMPT, chat.sizing(), 2, rows=0)
    assert next(batches)[0] == 2  # the batch before the bad image comes whole
    with pytest.raises(FileNotFoundError, match="missing.png"):
        next(batches)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_generation_on_a_gpu_runs_the_vision_tower_in_one_attention_call_per_layer(model_and_processor,
                                                                                       monkeypatch):
    from torch.nn.attention import varlen

    from latexocr.engine import kernels
    model, processor = model_and_processor
    assert kernels.varlen_unusable(torch.device("cuda", 0)) == ""  # its own check calls the kernel: before counting
    calls = []
    own = varlen.varlen_attn
    monkeypatch.setattr(varlen, "varlen_attn", lambda *args, **kwargs: calls.append(1) or own(*args, **kwargs))
    images = formula_images(5, seed=9)
    bf16 = modeling.generation_model(copy.deepcopy(model).to("cuda"), torch.bfloat16)
    fused = modeling.predict(bf16, processor, images, batch_size=3, **SETTINGS)
    assert len(calls) == 2 * len(kernels.vision_attentions(bf16))  # two batches, each layer once
    assert not any("forward" in vars(attention) for attention in kernels.vision_attentions(bf16))
    monkeypatch.setitem(kernels._varlen_check, torch.device("cuda", 0), "off for the comparison")
    per_image = modeling.predict(bf16, processor, images, batch_size=3, **SETTINGS)
    assert len(calls) == 2 * len(kernels.vision_attentions(bf16))  # the model's own code ran the second time
    # bf16 rounds the two attentions differently; the tiny random model's near-ties may flip a token, not most
    assert sum(a == b for a, b in zip(fused, per_image)) >= 3
