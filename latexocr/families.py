"""The Qwen VL model families this pipeline fine-tunes, told apart by the model folder's config.json.

Everything that differs between them is here: how many pixels one image token covers (the image sizing
follows from it) and what keeps LoRA out of the vision tower. The chat template, the processor and the
architecture come from the model folder itself and are loaded through transformers' auto classes.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str  # as the model cards spell it
    model_type: str  # config.json's model_type
    patch_size: int  # px per side of one vision patch
    merge_size: int  # patches per side that the vision tower merges into one image token

    @property
    def token_px(self) -> int:
        """px per side of the square block that becomes one image token."""
        return self.patch_size * self.merge_size

    def record(self) -> dict:
        """What train_config.json keeps of the family."""
        return dict(asdict(self), token_px=self.token_px)


# Patch and merge sizes as in each family's vision config and preprocessor_config.json.
FAMILIES = {f.model_type: f for f in (
    Family("Qwen2-VL", "qwen2_vl", patch_size=14, merge_size=2),
    Family("Qwen2.5-VL", "qwen2_5_vl", patch_size=14, merge_size=2),
    Family("Qwen3-VL", "qwen3_vl", patch_size=16, merge_size=2),
)}

# LoRA adapts the language model only. All three families keep the vision tower under model.visual, and
# Qwen2.5-VL's vision blocks have gate/up/down_proj layers of their own that the target names would catch.
LORA_EXCLUDE_MODULES = r"model\.visual\..*"  # a regex peft matches against each full module name


def detect(model_dir: str | Path) -> Family:
    """The family of the model in `model_dir`, from its config.json; an unsupported model stops the run."""
    config_path = Path(model_dir) / "config.json"
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in FAMILIES:
        supported = ", ".join(f"{f.model_type} ({f.name})" for f in FAMILIES.values())
        raise SystemExit(f"{config_path}: model_type {model_type!r} is not a model this pipeline fine-tunes. "
                         f"Supported model types: {supported}. Pass one of those as --model_id, "
                         "e.g. Qwen/Qwen2.5-VL-3B-Instruct.")
    return FAMILIES[model_type]
