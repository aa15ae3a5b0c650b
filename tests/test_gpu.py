"""What runs only on a GPU: CUDA-graph capture and replay, the memory probe, and train.py end to end with both.

Run on a CUDA machine whenever GPU-only code changes: python -m pytest -q -m gpu (docs/testing.md)."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting

from conftest import LORA_TARGETS, run_script, synthetic_images
from latexocr import chat, modeling
from latexocr.data import read_csv, write_conversations
from latexocr.engine import graphs, loss as answer_loss, memory
from latexocr.engine.batching import AnswerBatches
from latexocr.engine.distributed import Processes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TARGETS = LORA_TARGETS


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    return synthetic_images(tmp_path_factory.mktemp("gpu_samples"), 8, seed=11)


def gpu_lora_model(model_dir):
    """As train.py trains on a GPU: a bf16 base, fp32 LoRA weights with B moved off zero."""
    model, processor = modeling.load_base_model(model_dir, "cuda")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.data = parameter.data.float()
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
    return model.train(), processor


def test_a_captured_step_replays_the_eager_loss_and_gradients(tiny_model_dir, samples):
    model, processor = gpu_lora_model(tiny_model_dir)
    batches = AnswerBatches(chat.TrainCollator(processor, chat.PROMPT, chat.sizing()), 2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    step_graphs = graphs.StepGraphs(model, capture=True)
    for batch_samples in (samples[:4], samples[4:]):  # captured, then a second batch replayed in the same graph
        batch = {k: v.cuda() for k, v in batches(batch_samples).items()}
        denominator = len(batch["answer_targets"])
        with disable_input_dtype_casting(model):
            replayed = step_graphs.step(batch, denominator, min_rows=graphs.ROWS_MULTIPLE)
            captured = {n: g.clone() for n, g in zip(names, step_graphs.grads)}
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                expected = answer_loss.AnswerLoss(model)(model, batch)
            expected.backward()
        assert replayed is not None and not step_graphs.failed
        torch.testing.assert_close(replayed, expected.detach().float(), rtol=1e-2, atol=1e-3)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                cosine = torch.nn.functional.cosine_similarity(captured[name].flatten(), parameter.grad.flatten(), 0)
                assert cosine > 0.99, name
        model.zero_grad(set_to_none=True)
    assert step_graphs.captures == 1  # both batches ran in the one graph of their shape
    step_graphs.finish(model)


def test_the_probe_finds_what_fits_and_says_when_nothing_does(tiny_model_dir, samples):
    model, processor = gpu_lora_model(tiny_model_dir)
    batches = AnswerBatches(chat.TrainCollator(processor, chat.PROMPT, chat.sizing()), 2)
    loss = answer_loss.AnswerLoss(model)
    assert memory.largest_fitting_micro_batch(model, loss, batches, samples, 8, 2**20, "cuda:0", Processes()) == 8
    free = torch.cuda.mem_get_info()[0]
    assert memory.largest_fitting_micro_batch(model, loss, batches, samples, 8, 2 * free, "cuda:0",
                                              Processes()) is None


@pytest.mark.slow
def test_train_py_on_a_gpu_learns_with_graphs_and_predicts_what_infer_py_does(tmp_path):
    """The learning test on a GPU: the CUDA graphs, the vision cache and Liger's kernels in the steps, bf16."""
    run_script("data2csv.py", "--source=synthetic", "--max_data_number=40", cwd=tmp_path)
    rows = [(image, text) for _, image, text in read_csv(tmp_path / "latex_ocr_train.csv") if len(text) <= 60]
    write_conversations(tmp_path / "eight.json", rows[:8])
    run_script("train.py", "--model_id=tiny-random", "--train_json_path=eight.json", "--val_json_path=eight.json",
               "--batch_size=8", "--max_steps=300", "--learning_rate=3e-3", "--lr_scheduler_type=constant",
               "--logging_steps=50", "--save_steps=1000", "--swanlab_mode=disabled", cwd=tmp_path)
    results = json.loads((tmp_path / "output/Qwen2-VL-2B-LatexOCR/train_results.json").read_text())
    assert results["cuda_graphs_on"] and results["cuda_graphs"] >= 1 and results["vision_cache"]
    run_script("infer.py", "--image=eight.json", cwd=tmp_path)
    folder = tmp_path / "output/Qwen2-VL-2B-LatexOCR"
    predictions = [json.loads(line) for line in (folder / "infer" / "predictions.jsonl").open()]
    assert sum(p["prediction"] == p["reference"] for p in predictions) >= 7  # bf16 training: near-ties may flip one
    evaluated = [json.loads(line) for line in (folder / "eval" / "predictions.jsonl").open()]
    assert [p["prediction"] for p in evaluated] == [p["prediction"] for p in predictions]
