"""What trains: LoRA adapters or every weight (TUNER), on the language model and, if asked, on the vision side
(TRAIN_VISION: the merger that turns vision patches into language tokens, or the whole vision tower with it).

The peers' names for the same choices: ms-swift `--train_type lora|full`, `--freeze_vit`, `--freeze_aligner`;
LLaMA-Factory `finetuning_type: lora|full`, `freeze_vision_tower`, `freeze_multi_modal_projector`.
"""

import torch

from latexocr import families, modeling

# The vision side's parts, under model.visual in all three families: the merger (Qwen3-VL's deepstack mergers are
# mergers too), and everything else of the tower.
MERGER_PARTS = ("merger", "deepstack_merger_list")


def base_model(model):
    """The transformers model under a peft wrapper, or the model itself (full fine-tuning)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def vision_part(name: str) -> str | None:
    """"merger" or "tower" for a parameter or module name under the vision side; None for the language model."""
    parts = name.split(".")
    if "visual" not in parts:
        return None
    below = parts[parts.index("visual") + 1:]
    return "merger" if below and below[0] in MERGER_PARTS else "tower"


def trains_vision(part: str | None, train_vision: str) -> bool:
    return part is not None and (train_vision == "all" or (train_vision == "merger" and part == "merger"))


def outside_language_model(tuner: str, train_vision: str) -> str:
    """What trains beyond the language model's layers ("" when nothing does): it keeps the CUDA graphs off (they hold
    the language model's layers only), and when it is the vision side, the vision cache (a vision side that trains
    gives other outputs at every step)."""
    if train_vision != "none":
        return "the vision tower" if train_vision == "all" else "the merger"
    return "the token embeddings" if tuner == "full" else ""


def lora_targets(model, target_modules: list[str], train_vision: str):
    """peft's target_modules and exclude_modules. The language model's layers of those names; with train_vision, also
    every linear layer of the merger (or the whole vision side), named in full. Qwen2.5-VL's vision blocks have
    gate/up/down_proj layers of their own, which the names alone would catch."""
    if train_vision == "none":
        return target_modules, families.LORA_EXCLUDE_MODULES
    names = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and (
        (vision_part(name) is None and ".language_model." in f".{name}" and name.split(".")[-1] in target_modules)
        or trains_vision(vision_part(name), train_vision))]
    return names, None


def prepare(model, tuner: str, train_vision: str, lora_rank: int, lora_alpha: float, lora_dropout: float,
            target_modules: list[str]):
    """The model to train: a peft model (LoRA) or the model itself with what trains set to requires_grad."""
    if tuner == "lora":
        from peft import LoraConfig, get_peft_model
        targets, exclude = lora_targets(model, target_modules, train_vision)
        lora = LoraConfig(task_type="CAUSAL_LM", r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                          target_modules=targets, exclude_modules=exclude)
        with modeling.peft_quietly():
            return get_peft_model(model, lora)
    for name, parameter in model.named_parameters():
        part = vision_part(name)
        parameter.requires_grad_(part is None or trains_vision(part, train_vision))
    return model


def weights_file(tuner: str) -> str:
    """What the Trainer saves in OUTPUT_DIR and in each checkpoint."""
    return "adapter_model.safetensors" if tuner == "lora" else "model.safetensors"


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

