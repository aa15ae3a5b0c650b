"""The training engine's pieces, each alone and in process: the loss, the collator, the padded graph steps, the plan."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import LORA_TARGETS, synthetic_images
from latexocr import chat, families, modeling
from latexocr.engine import graphs, loss as answer_loss, preflight
from latexocr.engine.batching import AnswerBatches, answer_positions, split
from latexocr.engine.distributed import Processes
from latexocr.engine.plan import Settings, make_plan
from latexocr.engine.vision_cache import VisionCache

TARGETS = LORA_TARGETS


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return synthetic_images(tmp_path_factory.mktemp("engine_samples"), 12, seed=7)


def lora_model(model_dir, seed: int = 0):
    model, _ = modeling.load_base_model(model_dir, "cpu")
    torch.manual_seed(seed)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():  # B starts at zero, which would leave half the gradients zero
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model.train()


def gradients(model) -> dict:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("chunk", [3, 256])
def test_head_cross_entropy_is_the_summed_cross_entropy_and_its_gradient(chunk):
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(10, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator)
    targets = torch.randint(0, 50, (10,), generator=generator)
    targets[[2, 7]] = chat.IGNORE_INDEX  # padded rows add nothing
    total = answer_loss.HeadCrossEntropy.apply(rows, weight, targets, chunk)
    (gradient,) = torch.autograd.grad(3 * total, rows)
    reference_rows = rows.detach().clone().requires_grad_()
    expected = torch.nn.functional.cross_entropy(reference_rows @ weight.T, targets, reduction="sum")
    (expected_gradient,) = torch.autograd.grad(3 * expected, reference_rows)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(gradient, expected_gradient)
    assert gradient[[2, 7]].abs().max() == 0


def test_the_head_returns_rows_only_inside_the_block_and_its_own_forward_after(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    head = model.get_base_model().get_output_embeddings()
    hidden = torch.randn(2, 5, head.in_features)
    positions = torch.tensor([1, 7])
    with answer_loss.head_rows_only(head, positions):
        torch.testing.assert_close(head(hidden), hidden.reshape(-1, head.in_features)[positions])
    assert "forward" not in vars(head) and head(hidden).shape == (2, 5, head.out_features)
    with pytest.raises(RuntimeError, match="boom"), answer_loss.head_rows_only(head, positions, logits=True):
        assert head(hidden).shape == (2, head.out_features)
        raise RuntimeError("boom")
    assert "forward" not in vars(head)  # undone on the way out of an error too


@pytest.mark.parametrize("cached", [False, True])
def test_the_answer_loss_equals_the_models_own_loss(tiny_model_dir, processor, samples, cached):
    """Rows-only head, CPU-side positions and (cached) vision outputs: the model's own loss, and its gradients."""
    model = lora_model(tiny_model_dir)
    collator = chat.TrainCollator(processor, chat.PROMPT, chat.sizing())
    cache = VisionCache().fill(model, collator, samples, "cpu", num_workers=0, show_progress=False) if cached else None
    batches = AnswerBatches(collator, 2, cache.outputs if cache else None)
    batch = batches(samples[:6])
    assert ("pixel_values" in batch) != cached and ("vision_outputs" in batch) == cached
    loss = answer_loss.AnswerLoss(model, cache)(model, batch)
    loss.backward()
    ours = gradients(model)
    expected = model(**collator(samples[:6])).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    reference = gradients(model)
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-6, msg=name)
    assert "forward" not in vars(model.get_base_model().get_output_embeddings())


def test_answer_positions_predict_exactly_the_labelled_tokens(processor, samples):
    collator = chat.TrainCollator(processor, chat.PROMPT, chat.sizing())
    batch = collator(samples[:4])
    positions, targets = answer_positions(batch["labels"])
    labels, length = batch["labels"], batch["labels"].shape[1]
    assert len(positions) == int((labels != chat.IGNORE_INDEX).sum())
    assert torch.equal(targets, batch["input_ids"].flatten()[positions + 1])
    assert all((positions + 1) % length != 0)  # no position predicts across a row's end
    assert set(targets.tolist()) >= {processor.tokenizer.convert_tokens_to_ids(chat.END_OF_ANSWER)}


def test_a_batch_over_the_token_budget_splits_into_passes_that_cover_it(processor, samples):
    collator = chat.TrainCollator(processor, chat.PROMPT, chat.sizing())
    examples = collator.encode(samples[:8])
    lengths = [len(e["input_ids"]) for e in examples]
    assert split(examples, 0) == [list(range(8))] == split(examples, 8 * max(lengths))
    budget = 3 * max(lengths)
    groups = split(examples, budget)
    assert sorted(i for group in groups for i in group) == list(range(8)) and len(groups) > 1
    assert all(len(group) * max(lengths[i] for i in group) <= budget for group in groups)
    whole = AnswerBatches(collator, 2)(samples[:8])
    chunked = AnswerBatches(collator, 2, max_tokens=budget)(samples[:8])
    assert len(chunked["chunks"]) == len(groups)
    assert int((chunked["labels"] != chat.IGNORE_INDEX).sum()) == int((whole["labels"] != chat.IGNORE_INDEX).sum())


def test_padded_graph_steps_give_the_eager_loss_and_gradients(tiny_model_dir, processor, samples):
    """What a GPU captures as a CUDA graph (padded to fixed shapes, gradients added into buffers), run directly."""
    model = lora_model(tiny_model_dir)
    collator = chat.TrainCollator(processor, chat.PROMPT, chat.sizing())
    batches = AnswerBatches(collator, 2)
    step_graphs = graphs.StepGraphs(model, capture=False)
    batch = batches(samples[:5])
    padded = step_graphs.step(batch, denominator=len(batch["answer_targets"]))
    ours = {n: g.clone() for n, g in zip([n for n, p in model.named_parameters() if p.requires_grad],
                                         step_graphs.grads)}
    model.zero_grad(set_to_none=True)
    expected = answer_loss.AnswerLoss(model)(model, batch)
    expected.backward()
    torch.testing.assert_close(padded, expected.detach(), rtol=1e-5, atol=1e-6)
    for name, grad in gradients(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    (shape,) = step_graphs.shapes
    assert shape[1] % graphs.LENGTH_MULTIPLE == 0 and shape[2] % graphs.ROWS_MULTIPLE == 0


def plan_for(model, processor, samples, model_dir, **settings):
    family = families.detect(model_dir)
    sizing = chat.sizing(token_px=family.token_px)
    collator = chat.TrainCollator(processor, chat.PROMPT, sizing)
    lengths = preflight.check_samples(samples, processor, chat.PROMPT, sizing, 2048, "samples", show_progress=False)
    outside = settings.pop("outside", "")
    return make_plan(Settings(batch_size=4, **settings), model, collator, family, samples, lengths.tokens,
                     lengths.image_tokens, lengths.answer_rows, Processes(), "cpu", 1000, outside,
                     vision_trains=outside in ("the vision tower", "the merger"), show_progress=False)


def test_the_plan_says_what_it_chose_and_why(tiny_model_dir, processor, samples):
    model = lora_model(tiny_model_dir)
    plan = plan_for(model, processor, samples, tiny_model_dir)
    assert (plan.micro_batch, plan.accumulation, plan.checkpointing) == (4, 1, False)
    assert plan.vision_cache is not None and len(plan.vision_cache.outputs) == len(samples)
    assert plan.step_graphs is None and isinstance(plan.loss, answer_loss.AnswerLoss)
    assert plan.record()["plan"] == plan.notes and any(n.startswith("batch: 4 samples") for n in plan.notes)
    padded = plan_for(model, processor, samples, tiny_model_dir, cuda_graphs="true", vision_cache_gib=0.0)
    assert padded.step_graphs is not None and padded.vision_cache is None
    assert "vision cache: off (vision_cache_gib=0)" in padded.notes[0]
    plain = plan_for(model, processor, samples, tiny_model_dir, fast=False)
    assert plain.loss is None and isinstance(plain.batches, chat.TrainCollator) and plain.vision_cache is None
    vision = plan_for(model, processor, samples, tiny_model_dir, outside="the vision tower")
    assert vision.vision_cache is None and "off with the vision tower training" in vision.notes[0]
    embeddings = plan_for(model, processor, samples, tiny_model_dir, outside="the token embeddings")
    assert embeddings.vision_cache is not None  # the frozen vision tower's outputs do not change
    with pytest.raises(SystemExit, match="--cuda_graphs=true does not work with the vision tower training"):
        plan_for(model, processor, samples, tiny_model_dir, cuda_graphs="true", outside="the vision tower")


@pytest.mark.parametrize("model_id", list(modeling.TINY_MODELS))
def test_the_fast_path_finds_what_it_relies_on_and_names_what_is_gone(model_id):
    from latexocr.engine import kernels
    model = lora_model(modeling.resolve_model(model_id))
    assert kernels.missing_internals(model, on_gpu=False) == ""
    del model.get_base_model().model.language_model.layers[0].mlp.act_fn  # as an upgrade might rename it
    assert "the MLP's gate/up/down_proj with a SiLU" in kernels.missing_internals(model, on_gpu=False)
    for layer in kernels.lora_layers(model):
        del layer.lora_variant
    assert "LoRA layers lack lora_variant" in kernels.missing_internals(model, on_gpu=False)


def test_graphs_are_refused_for_qwen3_vl_and_its_deepstack_features(processor, samples):
    model_dir = modeling.resolve_model("tiny-random-qwen3-vl")
    model = lora_model(model_dir)
    qwen3_processor = modeling.load_processor(model_dir)
    with pytest.raises(SystemExit, match="--cuda_graphs=true does not work with Qwen3-VL"):
        plan_for(model, qwen3_processor, samples, model_dir, cuda_graphs="true")


def test_the_pre_flight_says_when_answers_exceed_the_generation_cap(processor, samples):
    lengths = preflight.check_samples(samples, processor, chat.PROMPT, chat.sizing(), 2048, "samples",
                                      show_progress=False)
    longest = max(lengths.answer_rows)
    assert lengths.over_cap(longest, first=0) == ""
    note = lengths.over_cap(longest - 1, first=0)
    assert f"the longest {longest}" in note and f"Raise --eval_max_new_tokens to {longest}" in note
    assert lengths.over_cap(longest - 1, first=len(samples)) == ""  # no val samples past the training ones


def test_checkpointing_is_switched_by_the_name_this_transformers_gives_it():
    import dataclasses

    from transformers import TrainingArguments

    from latexocr.engine.trainer import checkpointing_arguments

    @dataclasses.dataclass
    class Before:  # transformers 5.17's TrainingArguments had only gradient_checkpointing
        gradient_checkpointing: bool = False
        gradient_checkpointing_kwargs: dict | None = None

    assert checkpointing_arguments(True, Before) == {"gradient_checkpointing": True,
                                                     "gradient_checkpointing_kwargs": {"use_reentrant": False}}
    on = TrainingArguments(output_dir="unused", use_cpu=True, **checkpointing_arguments(True, TrainingArguments))
    off = TrainingArguments(output_dir="unused", use_cpu=True, **checkpointing_arguments(False, TrainingArguments))
    assert (on.gradient_checkpointing, off.gradient_checkpointing) == (True, False)
