"""The training step's fused kernels (engine/kernels.py) and its unmasked attention compute what the model's own code
computes."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting

from conftest import LORA_TARGETS
from latexocr import modeling
from latexocr.engine import kernels

TARGETS = LORA_TARGETS


def lora_model(model_dir, seed: int = 0):
    model, _ = modeling.load_base_model(model_dir, "cpu")
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero, which would hide a wrong scaling or a missing term
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    return model.train()


def forward_backward(model, embeds, seed: int):
    """The language model's output on `embeds` with dropout seeded, and each LoRA weight's gradient."""
    torch.manual_seed(seed)
    hidden = model.get_base_model().model.language_model(inputs_embeds=embeds).last_hidden_state
    (hidden ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return hidden.detach(), grads


def test_fused_language_model_gives_the_same_outputs_and_gradients(tiny_model_dir):
    plain, fused = lora_model(tiny_model_dir), lora_model(tiny_model_dir)
    layers = len(fused.get_base_model().model.language_model.layers)
    # per layer the LoRA linears, 2 norms and the MLP (on a CPU it runs its own code: Liger's kernel needs a GPU);
    # then the final norm, and each vision block's attention
    changed = kernels.fuse(fused)
    vision_blocks = len(fused.get_base_model().model.visual.blocks)
    assert len(changed) == layers * (len(TARGETS) + 3) + 1 + vision_blocks
    embeds = torch.randn(3, 17, fused.get_base_model().config.get_text_config().hidden_size)
    for seed in (1, 2):  # dropout draws the same masks in the same order
        expected, expected_grads = forward_backward(plain, embeds, seed)
        hidden, grads = forward_backward(fused, embeds, seed)
        torch.testing.assert_close(hidden, expected, rtol=1e-5, atol=1e-5)
        assert grads.keys() == expected_grads.keys() and len(grads) == layers * len(TARGETS) * 2
        for name in grads:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with fused.disable_adapter(), plain.disable_adapter(), torch.no_grad():  # the fused linear steps aside
        plain.eval(), fused.eval()
        without = fused.get_base_model().model.language_model(inputs_embeds=embeds).last_hidden_state
        base = plain.get_base_model().model.language_model(inputs_embeds=embeds).last_hidden_state
        torch.testing.assert_close(without, base)
        assert not torch.allclose(without, expected, atol=1e-3)  # the adapter changed the output above
    kernels.unfuse(changed)  # undone, as train.py does before evaluating: the model's own code again
    assert not any("forward" in vars(module) for module in fused.modules())
    torch.testing.assert_close(forward_backward(fused, embeds, seed=1)[0], forward_backward(plain, embeds, seed=1)[0],
                               rtol=0, atol=0)


@pytest.mark.parametrize("fuse", [False, True])
def test_right_padding_needs_no_attention_mask(tiny_model_dir, fuse):
    """Training batches are right-padded and run without a mask: causal attention keeps the real tokens from the
    padding, so their hidden states are those of the masked batch."""
    model = lora_model(tiny_model_dir).eval()
    if fuse:
        kernels.fuse(model)
    language_model = model.get_base_model().model.language_model
    embeds = torch.randn(2, 12, model.get_base_model().config.get_text_config().hidden_size)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, 7:] = 0  # the first row is 7 tokens long, then padding
    with torch.no_grad():
        masked = language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        unmasked = language_model(inputs_embeds=embeds).last_hidden_state
        shorter = language_model(inputs_embeds=embeds[:1, :7]).last_hidden_state
    torch.testing.assert_close(unmasked[0, :7], masked[0, :7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmasked[0, :7], shorter[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(unmasked[1], masked[1], rtol=1e-5, atol=1e-5)
    left = torch.cat([embeds[:1, 7:], embeds[:1, :7]], dim=1)  # the same padding on the left would change them
    assert not torch.allclose(language_model(inputs_embeds=left).last_hidden_state[0, 5:], shorter[0], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels and bf16 autocast need a CUDA GPU")
def test_fused_language_model_on_a_gpu(tiny_model_dir):
    """On a GPU in bf16 (the MLP then runs Liger's kernel): outputs and gradients as the model's own, within bf16's
    rounding; unfused, the model's own code again."""
    plain, fused = lora_model(tiny_model_dir).cuda(), lora_model(tiny_model_dir).cuda()
    changed = kernels.fuse(fused)
    for model in (plain, fused):
        model.get_base_model().to(torch.bfloat16)
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()  # as in training: LoRA weights fp32, the base bf16
    embeds = torch.randn(4, 33, plain.get_base_model().config.get_text_config().hidden_size, device="cuda",
                         dtype=torch.bfloat16)
    # As train.py trains: peft's cast of each adapter's input to fp32 off (a dropout draws its mask by dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16), disable_input_dtype_casting(plain), \
            disable_input_dtype_casting(fused):
        expected, expected_grads = forward_backward(plain, embeds, seed=3)
        hidden, grads = forward_backward(fused, embeds, seed=3)
    torch.testing.assert_close(hidden, expected, rtol=0.05, atol=0.05)
    for name in grads:
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), expected_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name
    kernels.unfuse(changed)
    assert not any("forward" in vars(module) for module in fused.modules())


def vision_tower_grads(model, pixel_values, grid_thw):
    """The vision tower's output (merger included) on images of different sizes, and each weight's gradient."""
    output = model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw)
    output = torch.cat(output.pooler_output if hasattr(output, "pooler_output") else output)
    (output.float() ** 2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.model.visual.named_parameters()}
    model.zero_grad(set_to_none=True)
    return output.detach().float(), grads


def two_images(processor, device):
    from PIL import Image
    images = [Image.new("RGB", (280, 56), "white"), Image.new("RGB", (112, 84), "gray")]  # different patch counts
    encoded = processor.image_processor(images=images, return_tensors="pt")
    return encoded["pixel_values"].to(device), encoded["image_grid_thw"].to(device)


def test_vision_attention_runs_the_models_own_code_off_a_gpu(tiny_model_dir):
    """On a CPU (and in fp32) the vision blocks' attention, fused, is the model's own per-image attention: equal."""
    plain, processor = modeling.load_base_model(tiny_model_dir, "cpu")
    fused, _ = modeling.load_base_model(tiny_model_dir, "cpu")
    changed = kernels.fuse(fused)
    attentions = kernels.vision_attentions(fused)
    assert attentions and all(module in changed for module in attentions)
    pixel_values, grid_thw = two_images(processor, "cpu")
    expected, _ = vision_tower_grads(plain.train(), pixel_values, grid_thw)
    output, _ = vision_tower_grads(fused.train(), pixel_values, grid_thw)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention needs a CUDA GPU")
def test_vision_attention_in_one_call_on_a_gpu(tiny_model_dir):
    """On a GPU in bf16, all images in one varlen flash-attention call per layer: the vision tower's output and its
    weights' gradients as with the model's per-image attention, within bf16's rounding."""
    plain, processor = modeling.load_base_model(tiny_model_dir, "cuda")
    fused, _ = modeling.load_base_model(tiny_model_dir, "cuda")
    assert kernels.varlen_unusable(torch.device("cuda", torch.cuda.current_device())) == ""
    kernels.fuse(fused)
    pixel_values, grid_thw = two_images(processor, "cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected, expected_grads = vision_tower_grads(plain.float().train(), pixel_values, grid_thw)
        output, grads = vision_tower_grads(fused.float().train(), pixel_values, grid_thw)
    torch.testing.assert_close(output, expected, rtol=0.05, atol=0.05)
    for name in grads:
        cosine = torch.nn.functional.cosine_similarity(grads[name].flatten(), expected_grads[name].flatten(), dim=0)
        assert cosine > 0.99, name


def test_vision_attention_is_left_alone_where_a_release_changed_its_arguments(tiny_model_dir, monkeypatch):
    """A vision attention whose forward takes other arguments than vision_attention passes on is not fused, in training
    or in generation, rather than called wrongly; the three families' tiny models all match today."""
    from latexocr.families import FAMILIES
    for model_type in FAMILIES:
        model_id = next(name for name, kind in modeling.TINY_MODELS.items() if kind == model_type)
        model, _ = modeling.load_base_model(modeling.resolve_model(model_id), "cpu")
        assert kernels.vision_attentions(model), model_type
    model, _ = modeling.load_base_model(tiny_model_dir, "cpu")
    attention_class = type(kernels.vision_attentions(model)[0])

    def renamed(self, hidden_states, cu_seqlens, rotary_pos_emb=None, position_embeddings=None, **kwargs):
        return hidden_states
    monkeypatch.setattr(attention_class, "forward", renamed)
    assert kernels.vision_attentions(model) == []
    with kernels.fused_vision_attention(model):
        assert not any("forward" in vars(block.attn) for block in model.model.visual.blocks)
