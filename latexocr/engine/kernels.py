"""Fewer, fused kernels, the one place where the engine reaches into libraries' internals.

- RMSNorm: torch's own fused `torch.nn.functional.rms_norm` (the model's code takes six kernels); on a GPU the norms
  took 11% of a step. 3.50 -> 3.08 ms per decoder layer of the 2B model (forward and backward of 16 x 256 tokens as
  a CUDA graph on an H200, bench/layers.py, 2026-11-29).
- The MLP's silu(gate) * up: one Liger kernel (`liger_kernel.ops.swiglu.LigerSiLUMulFunction`) on a GPU; 2.95 ->
  2.88 ms per layer. Not Liger's model-level API: `apply_liger_kernel_to_qwen2_vl` fails with transformers 5.23
  (liger-kernel 0.8.5 imports `LigerQwen2VLCausalLMOutputWithPast`, which is not there; seen on the H200,
  2026-12-01, as TRL's `--use_liger_kernel` fails).
- LoRA's last product, its scaling and the sum with the base output as one matrix multiply-add, reading peft's LoRA
  layer attributes: 3.08 -> 2.95 ms per layer.
- The vision tower's attention over all the batch's images in one call of torch's variable-length flash attention
  (`torch.nn.attention.varlen.varlen_attn`, cumulative lengths as flash-attn's varlen kernel takes them) where
  transformers, without the flash-attn package, runs one attention call per image and layer (768 a step when a
  small model trains its vision tower on 128 images, bench/from_scratch.py). On a GPU in bf16 or fp16 only, and not
  inside a CUDA graph capture (the longest image's length is read back once per forward); anywhere else, and if
  the kernel fails a first check against per-image attention, the model's own code runs.

The modules changed are found by their place in the model (each decoder layer's norms and MLP, the final norm, each
vision block's attention), not by class names. missing_internals() says, before any of it is used, which internal a
library upgrade took away; train.py then trains the plain way (--fast=false) and says so.
"""

import contextlib
import inspect
import sys

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


_varlen_check = {}  # device -> "" when varlen_attn matched per-image attention there, else why not
_longest = {}  # id(cu_seqlens) -> (cu_seqlens, its longest sequence): read back once per forward, not per layer


def varlen_unusable(device: torch.device) -> str:
    """Why torch's varlen attention cannot stand in for per-image attention on `device` ("" when it can): checked
    once per device, forward and backward on two sequences of different lengths against SDPA."""
    if device not in _varlen_check:
        try:
            # with autograd on, and outside inference mode: generation calls it inside torch.inference_mode
            with torch.inference_mode(False), torch.enable_grad():
                from torch.nn.attention.varlen import varlen_attn
                generator = torch.Generator(device).manual_seed(0)
                q, k, v = (torch.randn(40, 2, 64, device=device, generator=generator, dtype=torch.bfloat16,
                                       requires_grad=True) for _ in range(3))
                cu = torch.tensor([0, 16, 40], device=device, dtype=torch.int32)
                out = varlen_attn(q, k, v, cu, cu, 24, 24)
                out.float().square().sum().backward()
                grad_q = q.grad.clone()
                q.grad = None
                parts = [torch.nn.functional.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
                         .transpose(0, 1) for a, b in ((0, 16), (16, 40))]
                reference = torch.cat(parts)
                reference.float().square().sum().backward()
                close = torch.allclose(out.float(), reference.float(), atol=2e-2) and \
                    torch.allclose(grad_q.float(), q.grad.float(), atol=5e-2)
                _varlen_check[device] = "" if close else "its output or gradient differs from per-image attention"
        except Exception as error:  # an older torch, or a GPU its flash kernels do not support
            _varlen_check[device] = f"{type(error).__name__}: {error}"
    return _varlen_check[device]


def longest_sequence(cu_seqlens: torch.Tensor) -> int:
    if id(cu_seqlens) not in _longest or _longest[id(cu_seqlens)][0] is not cu_seqlens:
        if len(_longest) > 8:
            _longest.clear()
        _longest[id(cu_seqlens)] = cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return _longest[id(cu_seqlens)][1]


def vision_attention(attention, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                     position_embeddings: tuple | None = None, max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
    """A vision block's attention (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: the same code) over every image of the batch in
    one variable-length flash attention call, each image attending to itself only, as the model's per-image loop."""
    device = hidden_states.device
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else attention.proj.weight.dtype
    if not hidden_states.is_cuda or dtype not in (torch.bfloat16, torch.float16) or \
            torch.cuda.is_current_stream_capturing() or varlen_unusable(device):
        return type(attention).forward(attention, hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
    from torch.nn.attention.varlen import varlen_attn
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    length = hidden_states.shape[0]
    query, key, value = attention.qkv(hidden_states).reshape(length, 3, attention.num_heads, -1).permute(1, 0, 2, 3) \
        .unbind(0)
    query, key = rotate(query, key, *position_embeddings)
    cu_seqlens = cu_seqlens.to(torch.int32)
    longest = max_seqlen or longest_sequence(cu_seqlens)
    output = varlen_attn(query.to(dtype), key.to(dtype), value.to(dtype), cu_seqlens, cu_seqlens, longest, longest)
    return attention.proj(output.reshape(length, -1))


@contextlib.contextmanager
def fused_vision_attention(model):
    """Within the block, the vision tower's attention runs vision_attention (generation: it falls back to the model's
    own code off a GPU or in fp32), on the blocks whose attention has no forward of its own already."""
    changed = [attention for attention in vision_attentions(model) if "forward" not in vars(attention)]
    for attention in changed:
        attention.forward = vision_attention.__get__(attention)
    try:
        yield
    finally:
        unfuse(changed)


VISION_ATTENTION_ARGUMENTS = ["self", "hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen"]


def vision_attentions(model) -> list:
    """Each vision block's attention module, where its forward takes what vision_attention takes (transformers
    5.23's, for the three families); [] where the model has no such blocks, or a release changed them."""
    visual = getattr(getattr(base_model(model), "model", None), "visual", None)
    blocks = getattr(visual, "blocks", None) or []
    return [block.attn for block in blocks
            if all(hasattr(getattr(block, "attn", None), name) for name in ("qkv", "proj", "num_heads")) and
            hasattr(sys.modules[type(block.attn).__module__], "apply_rotary_pos_emb_vision") and
            list(inspect.signature(type(block.attn).forward).parameters)[:5] == VISION_ATTENTION_ARGUMENTS]


def fuse(model, norms: bool = True, mlp: bool = True, lora: bool = True, vision: bool = True) -> list:
    """The language model's norms, MLPs and plain LoRA linears of `model` run fused kernels, with the same math, and
    the vision tower's attention one call per layer. mlp=False under torch.compile, which fuses the MLP itself;
    lora=False under DeepSpeed ZeRO-3, which gathers a weight when its module is called, where B's weight is used
    directly. Returns the modules changed, for unfuse()."""
    language_model = base_model(model).model.language_model
    norm_modules, mlp_modules = norms_and_mlps(language_model)
    changed = []
    for module, forward, wanted in [*((m, rms_norm, norms) for m in norm_modules),
                                    *((m, swiglu_mlp, mlp) for m in mlp_modules),
                                    *((m, vision_attention, vision) for m in vision_attentions(model)),
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
