"""Fewer, fused kernels in the language model, the one place where the engine reaches into libraries' internals.

- RMSNorm and the MLP's silu(gate) * up: Liger's public API (apply_liger_kernel_to_qwen2_vl and its siblings,
  on the model instance), on a GPU only (its kernels are Triton). Its module-level replacements are undone at once,
  so a model built later in the same process runs transformers' own code.
- LoRA's last product, its scaling and the sum with the base output as one matrix multiply-add: written here,
  reading peft's LoRA layer attributes. It measurably wins: 2.95 against 3.08 ms per decoder layer of the 2B model
  (forward and backward of 16 x 256 tokens as a CUDA graph on an H200, bench/layers.py, 2026-11-29).

missing_internals() says, before any of it is used, which internal a library upgrade took away; train.py then
trains the plain way (--fast=false) and says so.
"""

import importlib

import torch

from latexocr.engine.vision_cache import base_model

LIGER = {"qwen2_vl": "apply_liger_kernel_to_qwen2_vl", "qwen2_5_vl": "apply_liger_kernel_to_qwen2_5_vl",
         "qwen3_vl": "apply_liger_kernel_to_qwen3_vl"}
MODELING = {"qwen2_vl": "transformers.models.qwen2_vl.modeling_qwen2_vl",
            "qwen2_5_vl": "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
            "qwen3_vl": "transformers.models.qwen3_vl.modeling_qwen3_vl"}
LORA_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "merged", "disable_adapters",
                   "active_adapters", "lora_variant", "lora_bias")


def lora_layers(model) -> list:
    from peft.tuners.lora import Linear as LoraLinear
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def missing_internals(model, on_gpu: bool) -> str:
    """What the fast path needs of transformers, peft and Liger that this install lacks, or "" when all is there."""
    import transformers
    missing = []
    base = base_model(model)
    if not hasattr(getattr(base, "model", None), "language_model") or not hasattr(base, "get_image_features"):
        missing.append(f"{type(base).__name__}.model.language_model / get_image_features (transformers "
                       f"{transformers.__version__})")
    if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):
        missing.append(f"Trainer.loss_is_scaled_for_ga (transformers {transformers.__version__})")
    layers = lora_layers(model)
    if layers and not all(hasattr(layers[0], name) for name in LORA_ATTRIBUTES):
        import peft
        lacking = [name for name in LORA_ATTRIBUTES if not hasattr(layers[0], name)]
        missing.append(f"peft {peft.__version__}'s LoRA layers lack {', '.join(lacking)}")
    if on_gpu:
        try:
            liger = importlib.import_module("liger_kernel.transformers")
            getattr(liger, LIGER[base.config.model_type])
        except (ImportError, AttributeError) as error:
            missing.append(f"liger-kernel: {error}")
    return "; ".join(missing)


def lora_linear(layer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's LoRA linear, base(x) + B(A(dropout(x))) * scaling, with the last product, its scaling and the sum in one
    matrix multiply-add. As in training with peft's input casting off, autocast decides the adapter's dtype; without
    autocast, an input of another dtype than the adapter's takes peft's own path (which casts it)."""
    b = layer.lora_B["default"].weight
    if layer.disable_adapters or layer.merged or layer.active_adapters != ["default"] or \
            (x.dtype != b.dtype and not torch.is_autocast_enabled(x.device.type)):
        return type(layer).forward(layer, x, *args, **kwargs)
    out = layer.base_layer(x, *args, **kwargs)
    down = layer.lora_A["default"](layer.lora_dropout["default"](x))
    return torch.addmm(out.reshape(-1, out.shape[-1]), down.reshape(-1, down.shape[-1]), b.t(),
                       alpha=layer.scaling["default"]).view(out.shape)


def liger(model, swiglu: bool = True) -> list:
    """Liger's RMSNorm and SwiGLU on the language model of `model`'s instance; returns the modules it changed."""
    base = base_model(model)
    model_type = base.config.model_type
    apply = getattr(importlib.import_module("liger_kernel.transformers"), LIGER[model_type])
    language_model = base.model.language_model
    before = {id(m): vars(m).get("forward") for m in language_model.modules()}
    modeling = importlib.import_module(MODELING[model_type])
    saved = dict(vars(modeling))
    options = dict(rope=False, cross_entropy=False, fused_linear_cross_entropy=False, rms_norm=True, model=base)
    if model_type != "qwen3_vl":  # Liger patches no Qwen3-VL MLP instance; qwen2_vl's also has a vision LayerNorm
        options["swiglu"] = swiglu
    if model_type == "qwen2_vl":
        options["layer_norm"] = False
    apply(**options)
    for name, value in saved.items():  # the module-level classes and functions back, for models built later
        if vars(modeling).get(name) is not value:
            setattr(modeling, name, value)
    return [m for m in language_model.modules() if vars(m).get("forward") is not before.get(id(m))]


def fuse(model, on_gpu: bool, mlp: bool = True, lora: bool = True) -> list:
    """The language model's norms and MLPs through Liger (GPU), its plain LoRA linears as one multiply-add. mlp=False
    under torch.compile, which fuses the MLP itself; lora=False under DeepSpeed ZeRO-3, which gathers a weight when
    its module is called, where B's weight is used directly. Returns the modules changed, for unfuse()."""
    changed = liger(model, swiglu=mlp) if on_gpu else []
    if lora:
        for layer in lora_layers(base_model(model).model.language_model):
            if "default" in layer.lora_A and "default" not in layer.lora_variant and not layer.lora_bias.get("default"):
                layer.forward = lora_linear.__get__(layer)  # no DoRA, no bias
                changed.append(layer)
    return changed


def unfuse(changed: list):
    """Each module's own forward back (evaluation runs the model's own code, as infer.py does)."""
    for module in changed:
        vars(module).pop("forward", None)
        vars(module).pop("_get_name", None)
