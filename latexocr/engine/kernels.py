"""Fewer, fused kernels in the language model, the one place where the engine reaches into libraries' internals.

- RMSNorm: torch's own fused `torch.nn.functional.rms_norm` (the model's code takes six kernels); on a GPU the norms
  took 11% of a step. 3.50 -> 3.08 ms per decoder layer of the 2B model (forward and backward of 16 x 256 tokens as
  a CUDA graph on an H200, bench/layers.py, 2026-11-29).
- The MLP's silu(gate) * up: one Liger kernel (`liger_kernel.ops.swiglu.LigerSiLUMulFunction`) on a GPU; 2.95 ->
  2.88 ms per layer. Not Liger's model-level API: `apply_liger_kernel_to_qwen2_vl` fails with transformers 5.23
  (liger-kernel 0.8.5 imports `LigerQwen2VLCausalLMOutputWithPast`, which is not there; seen on the H200,
  2026-12-01, as TRL's `--use_liger_kernel` fails).
- LoRA's last product, its scaling and the sum with the base output as one matrix multiply-add, reading peft's LoRA
  layer attributes: 3.08 -> 2.95 ms per layer.

The modules changed are found by their place in the model (each decoder layer's norms and MLP, the final norm),
not by class names. missing_internals() says, before any of it is used, which internal a library upgrade took away;
train.py then trains the plain way (--fast=false) and says so.
"""

import torch

from latexocr.engine.tuning import base_model

LORA_ATTRIBUTES = ("base_layer", "lora_A", "lora_B", "lora_dropout", "scaling", "merged", "disable_adapters",
                   "active_adapters", "lora_variant", "lora_bias")


def lora_layers(model) -> list:
    from peft.tuners.lora import Linear as LoraLinear
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def norms_and_mlps(language_model) -> tuple[list, list]:
    """The language model's RMSNorms (each layer's two, Qwen3-VL's query and key norms, the final one) and MLPs."""
    norms, mlps = [language_model.norm], []
    for layer in language_model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
        norms += [norm for norm in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None))
                  if norm is not None]
        mlps.append(layer.mlp)
    return norms, mlps


def missing_internals(model, on_gpu: bool) -> str:
    """What the fast path needs of transformers, peft and Liger that this install lacks, or "" when all is there."""
    import transformers
    from transformers.activations import SiLUActivation
    missing = []
    base = base_model(model)
    language_model = getattr(getattr(base, "model", None), "language_model", None)
    if language_model is None or not hasattr(base, "get_image_features"):
        missing.append(f"{type(base).__name__}.model.language_model / get_image_features (transformers "
                       f"{transformers.__version__})")
    else:
        try:
            norms, mlps = norms_and_mlps(language_model)
        except AttributeError as error:
            missing.append(f"the decoder layers' norms and MLP ({error})")
        else:
            if not all(hasattr(n, "variance_epsilon") and hasattr(n, "weight") for n in norms):
                missing.append("RMSNorm's weight / variance_epsilon")
            if not all(isinstance(getattr(m, "act_fn", None), (SiLUActivation, torch.nn.SiLU)) and
                       all(hasattr(m, name) for name in ("gate_proj", "up_proj", "down_proj")) for m in mlps):
                missing.append("the MLP's gate/up/down_proj with a SiLU")
    if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):
        missing.append(f"Trainer.loss_is_scaled_for_ga (transformers {transformers.__version__})")
    layers = lora_layers(model)
    if layers and not all(hasattr(layers[0], name) for name in LORA_ATTRIBUTES):
        import peft
        lacking = [name for name in LORA_ATTRIBUTES if not hasattr(layers[0], name)]
        missing.append(f"peft {peft.__version__}'s LoRA layers lack {', '.join(lacking)}")
    if on_gpu:
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction  # noqa: F401
        except ImportError as error:
            missing.append(f"liger-kernel: {error}")
    return "; ".join(missing)


def rms_norm(norm, hidden: torch.Tensor) -> torch.Tensor:
    """The Qwen models' RMSNorm in one fused kernel: weight * x / sqrt(mean(x^2) + eps), computed in fp32 and rounded
    once to x's dtype (the model's own code rounds the normalised x, then the product)."""
    if norm.weight.dtype != hidden.dtype:  # the model's code returns the weight's dtype then
        return type(norm).forward(norm, hidden)
    return torch.nn.functional.rms_norm(hidden, (hidden.shape[-1],), norm.weight, norm.variance_epsilon)


def swiglu_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    """The MLP, down(silu(gate(x)) * up(x)), with silu and the product in one Liger kernel on a GPU (Triton)."""
    if not x.is_cuda:
        return type(mlp).forward(mlp, x)
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    return mlp.down_proj(LigerSiLUMulFunction.apply(mlp.gate_proj(x), mlp.up_proj(x)))


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


def fuse(model, norms: bool = True, mlp: bool = True, lora: bool = True) -> list:
    """The language model's norms, MLPs and plain LoRA linears of `model` run fused kernels, with the same math.
    mlp=False under torch.compile, which fuses the MLP itself; lora=False under DeepSpeed ZeRO-3, which gathers a
    weight when its module is called, where B's weight is used directly. Returns the modules changed, for unfuse()."""
    language_model = base_model(model).model.language_model
    norm_modules, mlp_modules = norms_and_mlps(language_model)
    changed = []
    for module, forward, wanted in [*((m, rms_norm, norms) for m in norm_modules),
                                    *((m, swiglu_mlp, mlp) for m in mlp_modules),
                                    *((m, lora_linear, lora) for m in lora_layers(language_model)
                                      if "default" in m.lora_A and "default" not in m.lora_variant
                                      and not m.lora_bias.get("default"))]:  # no DoRA, no bias
        if wanted:
            module.forward = forward.__get__(module)
            changed.append(module)
    return changed


def unfuse(changed: list):
    """Each module's own forward back (evaluation runs the model's own code, as infer.py does)."""
    for module in changed:
        vars(module).pop("forward", None)
