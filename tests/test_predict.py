"""Generation: batches with left padding give what one image at a time gives."""

import itertools

import pytest
import torch

from latexocr import chat, modeling
from latexocr.synth import synthetic_samples


@pytest.fixture(scope="module")
def opinionated_model(tiny_model_dir):
    """The tiny model with larger random weights, so that different images get different outputs."""
    model, processor = modeling.load_base_model(tiny_model_dir, "cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0, 0.15, generator=generator)
    return model, processor


def test_batched_generation_equals_one_image_at_a_time(opinionated_model):
    model, processor = opinionated_model
    images = [image for image, _ in itertools.islice(synthetic_samples(6, seed=5), 6)]
    assert len({image.size for image in images}) > 3  # prompts of different lengths: padding is exercised
    settings = dict(prompt=chat.PROMPT, image_sizing=chat.sizing(),
                    max_new_tokens=12, show_progress=False)
    batched = modeling.predict(model, processor, images, batch_size=6, **settings)
    single = [modeling.predict(model, processor, [image], batch_size=1, **settings)[0] for image in images]
    assert batched == single
    assert len(set(single)) > 1  # the outputs depend on the image, so equality means something


def test_generation_runs_the_adapter_merged_into_the_weights(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    model, processor = modeling.load_base_model(tiny_model_dir, "cpu")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # as a trained adapter: B is no longer zero
                parameter.normal_(0, 0.5, generator=generator)
    images = [image for image, _ in itertools.islice(synthetic_samples(3, seed=2), 3)]
    inputs = chat.encode_prompts(processor, [chat.load_image(image, chat.sizing()) for image in images], chat.PROMPT)
    with torch.no_grad():
        adapted = model(**inputs).logits
        with model.disable_adapter():
            base = model(**inputs).logits
    merged = modeling.generation_model(model, torch.float32)
    assert not [name for name, _ in merged.named_parameters() if "lora" in name]
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted, atol=1e-4, rtol=0)
    assert (base - adapted).abs().max() > 1e-2  # so the match is the adapter's, not the base model's
    assert next(modeling.generation_model(merged, torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_bf16_generation_merges_the_adapter_before_rounding(tiny_model_dir):
    """--precision=bfloat16 gives the fp32 merge's weights, rounded once: the adapter's product is not rounded first."""
    from peft import LoraConfig, get_peft_model
    models = []
    for _ in range(2):
        model = modeling.load_base_model(tiny_model_dir, "cpu")[0].to(torch.bfloat16)  # as loaded on a GPU
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "down_proj"]))
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:  # fp32, as peft keeps an adapter on a bf16 base; B no longer zero
                    parameter.data = torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1))
        models.append(model)
    halved = modeling.generation_model(models[0], torch.bfloat16).state_dict()
    merged_in_fp32 = modeling.generation_model(models[1], torch.float32).state_dict()
    rounded = {k: v.to(torch.bfloat16) for k, v in merged_in_fp32.items()}
    assert halved.keys() == rounded.keys() and all(torch.equal(halved[k], rounded[k]) for k in halved)


def test_generation_precision_is_checked_and_tf32_is_off_while_merging_and_predicting(tiny_model_dir, monkeypatch):
    """train.py trains with TF32 on; its evaluation must merge and predict as infer.py does, in full fp32."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraModel
    with pytest.raises(SystemExit, match="precision half: expected auto, float32 or bfloat16"):
        modeling.generation_dtype("half")
    assert modeling.generation_dtype("bfloat16") == torch.bfloat16
    # auto: bf16 on a CUDA GPU only, whichever one; a CPU computes bf16 no faster
    assert [modeling.generation_dtype("auto", device) for device in ("cuda", "cuda:1", "cpu")] == \
        [torch.bfloat16, torch.bfloat16, torch.float32]
    merge, tf32_while_merging = LoraModel.merge_and_unload, []
    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *args, **kwargs: tf32_while_merging.append(
        torch.backends.cuda.matmul.allow_tf32) or merge(self, *args, **kwargs))
    model = get_peft_model(modeling.load_base_model(tiny_model_dir, "cpu")[0], LoraConfig(target_modules=["q_proj"]))
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True  # as train.py sets it for training
    try:
        with modeling.full_precision_float32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
        modeling.generation_model(model, torch.float32)
        assert tf32_while_merging == [False] and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def test_generation_stops_at_either_end_token(opinionated_model):
    """A model that ends an answer with <|endoftext|> (as a base model may) stops there too, as at <|im_end|>."""
    model, processor = opinionated_model
    ends = {processor.tokenizer.convert_tokens_to_ids(token) for token in chat.END_TOKENS}
    asked = {}
    generate = model.generate

    def spy(**kwargs):
        asked.update(kwargs)
        return generate(**kwargs)
    model.generate = spy
    try:
        image = next(iter(synthetic_samples(1, seed=2)))[0]
        modeling.predict(model, processor, [image], chat.PROMPT, chat.sizing(), max_new_tokens=2, show_progress=False)
    finally:
        del model.generate
    assert set(asked["eos_token_id"]) == ends and len(ends) == 2
