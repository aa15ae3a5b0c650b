"""The loss on the answer only, with the language-model head applied only where a label is.

The model's own loss builds logits at every position, (batch, length, 151,936) in fp32 and bf16 with their
gradients: the largest tensors of a step, though only the answer's ~20% of positions have a label. Picking those
positions before the head, and going through them ROWS_PER_CHUNK at a time, gives the same loss: the sum of token
losses divided by the labelled tokens of the optimizer step.
"""

import contextlib

import torch

from latexocr import chat
from latexocr.engine.tuning import base_model

ROWS_PER_CHUNK = 256  # labelled positions whose logits (151,936 each, fp32 with gradient) exist at once


class HeadCrossEntropy(torch.autograd.Function):
    """Cross-entropy summed over rows of hidden states through a frozen head (weight), `chunk` rows at a time, with the
    rows' gradient made in the forward pass: (softmax(logits) - one-hot(target)) @ weight. So a chunk's logits exist
    once, and the head's product runs twice per row instead of three times (forward, the forward again for the
    backward, backward). Rows whose target is IGNORE_INDEX add nothing, to the loss or to the gradient.

    Kept by hand rather than Liger's fused linear cross-entropy, which computes the same: Liger's reads the count
    of labelled rows back from the GPU (`.item()`) at every call, which a CUDA graph cannot hold, and it has no CPU
    path, where the tests compare this loss with the tutorial's."""

    @staticmethod
    def forward(ctx, rows, weight, targets, chunk: int):
        total, gradient = rows.new_zeros((), dtype=torch.float32), torch.empty_like(rows)
        for i in range(0, len(rows), chunk):
            # Under mixed precision accelerate hands the model's outputs back in fp32; the head computes as the model.
            logits = torch.nn.functional.linear(rows[i:i + chunk].to(weight.dtype), weight).float()
            labelled = (targets[i:i + chunk] != chat.IGNORE_INDEX).unsqueeze(1)
            target = targets[i:i + chunk].clamp(min=0).unsqueeze(1)
            log_total = torch.logsumexp(logits, dim=1, keepdim=True)
            total += ((log_total - logits.gather(1, target)) * labelled).sum()
            probabilities = logits.sub_(log_total).exp_()
            probabilities.scatter_add_(1, target, -labelled.float()).mul_(labelled)
            gradient[i:i + chunk] = probabilities.to(weight.dtype) @ weight
        ctx.save_for_backward(gradient)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        gradient, = ctx.saved_tensors
        return gradient * grad_total.to(gradient.dtype), None, None, None


def summed_loss(head, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over labelled rows (hidden states), through the head ROWS_PER_CHUNK rows at a time.

    A head that trains (full fine-tuning, or LoRA on lm_head) goes through its own forward instead, each chunk's
    logits recomputed for the backward: the chunks draw no random numbers, so the checkpoint need not save the RNG
    state (nor can it, in a CUDA graph)."""
    if type(head) is torch.nn.Linear and not head.weight.requires_grad and head.bias is None:
        return HeadCrossEntropy.apply(rows, head.weight, targets, ROWS_PER_CHUNK)

    def chunk_loss(hidden, chunk_targets):
        logits = head(hidden.to(head.weight.dtype))  # under mixed precision the rows arrive in fp32
        return torch.nn.functional.cross_entropy(logits.float(), chunk_targets, reduction="sum")
    return sum(torch.utils.checkpoint.checkpoint(chunk_loss, rows[i:i + ROWS_PER_CHUNK], targets[i:i + ROWS_PER_CHUNK],
                                                 use_reentrant=False, preserve_rng_state=False)
               for i in range(0, len(targets), ROWS_PER_CHUNK))


@contextlib.contextmanager
def head_rows_only(head, positions: torch.Tensor, logits: bool = False):
    """Within the block, the head returns the hidden states at `positions` of the flattened batch (or, with
    logits=True, the logits there), not logits everywhere. Its own forward is back when the block ends, however
    it ends: generation and evaluation never see the change."""
    own, original = vars(head).get("forward"), head.forward  # an instance's own forward (a library's patch) is kept

    def rows_only(hidden):
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        return original(rows) if logits else rows
    head.forward = rows_only
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own


class AnswerLoss:
    """The training loss: cross-entropy over the answer's tokens, divided by the labelled tokens of the whole optimizer
    step (num_items_in_batch, as the Trainer counts them over accumulation and processes) or of this batch.

    logits_in_chunks=False under ZeRO-3 and FSDP: the head's weight is whole only inside the model's forward, so
    the logits of the labelled rows are made there."""

    def __init__(self, model, vision_cache=None, logits_in_chunks: bool = True):
        self.head = base_model(model).get_output_embeddings()
        self.vision_cache, self.logits_in_chunks = vision_cache, logits_in_chunks

    def __call__(self, model, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        # Batches are right-padded: with causal attention alone no real token sees the padding, and the attention
        # runs the Flash kernel, which takes no mask (padded positions carry no label).
        inputs = {k: v for k, v in inputs.items() if k not in ("labels", "attention_mask")}
        positions, targets = inputs.pop("answer_positions"), inputs.pop("answer_targets")
        if "vision_outputs" in inputs:
            inputs["mm_encoder_outputs"] = self.vision_cache.encoder_outputs(inputs.pop("vision_outputs"))
        with head_rows_only(self.head, positions, logits=not self.logits_in_chunks):
            output = model(**inputs).logits  # the labelled positions' hidden states, or their logits
        if self.logits_in_chunks:
            total = summed_loss(self.head, output, targets)
        else:
            total = torch.nn.functional.cross_entropy(output.float(), targets, reduction="sum")
        return total / (num_items_in_batch if num_items_in_batch is not None else len(targets))
