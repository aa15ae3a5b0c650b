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
