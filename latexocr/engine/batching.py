"""Training batches with everything the model would otherwise work out on the GPU already done on the CPU.

The collator runs in the DataLoader's worker processes. Beyond chat.TrainCollator's tokens, labels and pixels it
adds what the model would compute on the GPU, reading values back and stalling it each time: the rotary
positions, the positions that predict a label (the answer and its end token) with their targets, and, with a
vision cache, the vision tower's outputs in place of the pixels. With `max_tokens` set, a batch with more tokens
(padding included) than that becomes several forward passes ("chunks") of similar lengths: the batch stays the
same, and so does the loss, but a batch of long samples no longer decides the memory every batch is given.

It holds no model: what it carries into the workers is the processor and, with a cache, CPU tensors.
"""

import torch

from latexocr import chat


class AnswerBatches:
    def __init__(self, collator: chat.TrainCollator, merge_size: int, vision_outputs: dict | None = None,
                 max_tokens: int = 0):
        self.collator, self.merge_size = collator, merge_size
        self.vision_outputs = vision_outputs  # sample id -> the vision tower's output (VisionCache.outputs)
        self.max_tokens = max_tokens  # 0: every batch runs whole

    def __call__(self, samples) -> dict:
        examples = self.collator.encode(samples)
        groups = split(examples, self.max_tokens)
        if len(groups) == 1:
            return self.batch(samples, examples)
        chunks = [self.batch([samples[i] for i in group], [examples[i] for i in group]) for group in groups]
        # "labels" only for the Trainer, which counts the labelled tokens of a step before running it
        return {"chunks": chunks, "labels": torch.cat([chunk["labels"].flatten() for chunk in chunks])}

    def batch(self, samples, examples) -> dict[str, torch.Tensor]:
        batch = self.collator.pad(examples)
        batch["position_ids"] = chat.rope_positions(batch, self.merge_size)
        if self.vision_outputs is not None:
            del batch["pixel_values"]
            batch["vision_outputs"] = torch.cat([self.vision_outputs[s.id] for s in samples], dim=1)
        batch["answer_positions"], batch["answer_targets"] = answer_positions(batch["labels"])
        return batch


def split(examples: list[dict], max_tokens: int) -> list[list[int]]:
    """Sample indices per forward pass: all in one, or shortest first in passes of at most max_tokens (each pass
    padded to its longest sample)."""
    lengths = [len(e["input_ids"]) for e in examples]
    if not max_tokens or len(lengths) * max(lengths) <= max_tokens:
        return [list(range(len(lengths)))]
    groups, group = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if group and (len(group) + 1) * lengths[i] > max_tokens:
            groups.append(group)
            group = []
        group.append(i)
    return groups + [group]


def answer_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions of the flattened batch whose next token is labelled (position i predicts token i + 1), and
    those tokens: the rows the loss needs, and nothing else."""
    predicts_a_label = torch.zeros_like(labels, dtype=torch.bool)
    predicts_a_label[:, :-1] = labels[:, 1:] != chat.IGNORE_INDEX
    positions = predicts_a_label.flatten().nonzero().squeeze(1)
    return positions, labels.flatten()[positions + 1]
