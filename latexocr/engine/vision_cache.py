"""The frozen vision tower's output for every training image, computed once before training and handed to the model
at every step in place of the pixels.

When only the language model trains (LoRA on it, or nothing of the vision side unfrozen) and the vision tower has
no dropout, an image's output is the same at every step of every epoch. Computed inside the step it costs a third
of the step's time: the tower runs one attention call per image per layer, and reads sizes back from the GPU at
each layer. Kept in CPU memory: image tokens x hidden size x (1 + Qwen3-VL's deepstack levels) numbers per image.
"""

import torch
from tqdm.auto import tqdm

from latexocr.engine.tuning import base_model

BATCH_SIZE = 32  # images per vision-tower pass while filling


def levels(model_config) -> int:
    """Vision outputs kept per image token: the output, plus Qwen3-VL's deepstack features."""
    return 1 + len(getattr(model_config.vision_config, "deepstack_visual_indexes", None) or [])


def size_gib(image_tokens: int, model_config, bytes_per_number: int) -> float:
    """RAM the cache takes for `image_tokens` image tokens in all."""
    hidden = model_config.get_text_config().hidden_size
    return image_tokens * levels(model_config) * hidden * bytes_per_number / 2**30


class VisionCache:
    def __init__(self):
        self.outputs = {}  # sample id -> (levels, image tokens, hidden): the output, then each deepstack level
        self.output_class = None

    def fill(self, model, collator, samples, device: str, num_workers: int, show_progress: bool = True):
        """Run the vision tower over the samples' images, sized and preprocessed as for training."""
        loader = torch.utils.data.DataLoader(samples, batch_size=BATCH_SIZE, collate_fn=collator,
                                             num_workers=num_workers)
        on_gpu = device.startswith("cuda")
        with torch.no_grad(), torch.autocast("cuda" if on_gpu else "cpu", dtype=torch.bfloat16, enabled=on_gpu):
            for n, batch in enumerate(tqdm(loader, desc="vision cache", unit="batch", disable=not show_progress)):
                output = base_model(model).get_image_features(
                    batch["pixel_values"].to(device), batch["image_grid_thw"].to(device), return_dict=True)
                levels = [output.pooler_output, *(getattr(output, "deepstack_features", None) or [])]
                for i, sample in enumerate(samples[n * BATCH_SIZE:(n + 1) * BATCH_SIZE]):
                    self.outputs[sample.id] = torch.stack([level[i] for level in levels]).cpu()
        self.output_class = type(output)
        return self

    def encoder_outputs(self, vision_outputs: torch.Tensor) -> dict:
        """The model's mm_encoder_outputs argument: what its vision tower would have returned for the batch."""
        deepstack = {"deepstack_features": [(level,) for level in vision_outputs[1:]]} if len(vision_outputs) > 1 else {}
        return {"image": self.output_class(pooler_output=(vision_outputs[0],), **deepstack)}
