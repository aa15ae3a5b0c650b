"""A training step's language-model forward, loss and backward captured once per batch shape as a CUDA graph, then
replayed: one launch from the CPU instead of about 7,000. Run eagerly, a step of the 2B model is paced by the CPU
launching kernels one at a time from Python, and the GPU waits for it more than half of the step.

A graph replays fixed shapes at fixed addresses. So each batch is copied into buffers kept for its shape: its length
padded to a multiple of LENGTH_MULTIPLE (after its own padding, which attention needs no mask for) and its labelled
positions to a multiple of ROWS_MULTIPLE, or to the rows of a shape of the same batch and length already seen with
more of them (the padded rows carry no target). Loss and gradients stay those of the batch. Outside the graph,
eagerly, run what reads sizes back from the GPU (the embedding lookup, placing the image features, the vision tower
when it is not cached) and the optimizer. The gradients are added into one buffer per trainable weight, which the
optimizer reads as the weights' .grad.

A shape seen for the first time is captured, then replayed. The largest is captured before training (capture_first):
its memory, freed inside the graphs' shared pool, then holds every smaller shape's graph. Without a GPU nothing is
captured and the same padded steps run directly, which is how the tests check them against plain steps.
"""

import time

import torch

from latexocr import chat
from latexocr.engine import memory
from latexocr.engine.loss import ROWS_PER_CHUNK, summed_loss
from latexocr.engine.tuning import base_model

LENGTH_MULTIPLE = 32  # tokens; larger means fewer graphs, more padding
ROWS_MULTIPLE = 2 * ROWS_PER_CHUNK  # labelled positions


def unfit_reason(several_processes: bool, distributed: str, checkpointing: bool, compiled: bool, deepstack: bool,
                 split_batches: bool, family_name: str, trains_outside_language_model: str = "") -> str:
    """Why graphs cannot hold this run's steps, or "": collective calls inside the backward (several processes),
    DeepSpeed's or FSDP's own backward, the recomputed forward of checkpointing (it saves and restores the RNG
    state), code torch.compile manages, Qwen3-VL's deepstack features (added inside the language model), batches
    split into passes of any size, or weights that train outside the language model (the embedding lookup and the
    vision tower run outside the graph)."""
    return ("several processes" if several_processes else f"--distributed={distributed}" if distributed != "ddp"
            else "activation checkpointing" if checkpointing else "--torch_compile" if compiled
            else family_name if deepstack else "--max_tokens_per_forward" if split_batches
            else trains_outside_language_model)


class StepGraphs:
    def __init__(self, model, capture: bool):
        self.capture = capture
        self.base = base_model(model)
        self.head = self.base.get_output_embeddings()
        self.language_model, self.image_token_id = self.base.model.language_model, self.base.config.image_token_id
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.shapes = {}  # (batch, length, rows) -> [buffers, graph, loss]; graph None when run without one
        self.pool = torch.cuda.graph_pool_handle() if capture else None  # shared: one shape's graph runs at a time
        self.warm_up_stream = torch.cuda.Stream() if capture else None
        self.captures, self.capture_s, self.failed = 0, 0.0, ""

    def accepts(self, inputs) -> bool:
        return not self.failed and "chunks" not in inputs

    def embeddings(self, inputs) -> torch.Tensor:
        """The language model's input: token embeddings with the image features in place of the image tokens."""
        device = inputs["input_ids"].device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            embeds = self.base.get_input_embeddings()(inputs["input_ids"])
            if "vision_outputs" in inputs:
                image = inputs["vision_outputs"][0]
            else:
                image = torch.cat(self.base.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"],
                                                               return_dict=True).pooler_output)
            placeholders = (inputs["input_ids"] == self.image_token_id).unsqueeze(-1)
            return embeds.masked_scatter(placeholders, image.to(embeds.dtype))

    def body(self, buffers: dict) -> torch.Tensor:
        """What the graph holds: the forward with the loss, and the backward into the gradient buffers."""
        device = buffers["embeds"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False):
            hidden = self.language_model(inputs_embeds=buffers["embeds"], position_ids=buffers["position_ids"],
                                         use_cache=False).last_hidden_state  # no mask: see loss.AnswerLoss
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, buffers["positions"])
            loss = summed_loss(self.head, rows, buffers["targets"]) / buffers["denominator"]
        loss.backward()
        return loss.detach()

    @staticmethod
    def fill(buffers: dict, inputs, embeds: torch.Tensor, denominator):
        length, padded = inputs["input_ids"].shape[1], buffers["embeds"].shape[1]
        buffers["embeds"][:, :length].copy_(embeds)
        buffers["embeds"][:, length:].zero_()
        buffers["position_ids"][..., :length].copy_(inputs["position_ids"])
        buffers["position_ids"][..., length:].zero_()
        positions, rows = inputs["answer_positions"], len(inputs["answer_positions"])
        buffers["positions"][:rows].copy_(positions + positions // length * (padded - length))  # into the padded rows
        buffers["positions"][rows:].zero_()
        buffers["targets"][:rows].copy_(inputs["answer_targets"])
        buffers["targets"][rows:].fill_(chat.IGNORE_INDEX)
        if isinstance(denominator, torch.Tensor) and denominator.device == buffers["denominator"].device:
            buffers["denominator"].copy_(denominator)
        else:  # a number (or one on the CPU): filled in as a kernel argument, with no copy to wait for
            buffers["denominator"].fill_(float(denominator))

    @staticmethod
    def new_buffers(length: int, rows: int, embeds: torch.Tensor) -> dict:
        batch, device = len(embeds), embeds.device
        return dict(embeds=embeds.new_zeros(batch, length, embeds.shape[-1]),
                    position_ids=torch.zeros(3, batch, length, dtype=torch.long, device=device),
                    positions=torch.zeros(rows, dtype=torch.long, device=device),
                    targets=torch.full((rows,), chat.IGNORE_INDEX, dtype=torch.long, device=device),
                    denominator=torch.ones((), device=device))

    def attach_gradients(self):
        """Point every trainable weight's .grad at its buffer: zeroed for a new step (the Trainer set them to None
        after the last optimizer step), or holding what earlier micro-batches of this step added."""
        fresh = [buffer for p, buffer in zip(self.params, self.grads) if p.grad is None]
        moved = [(buffer, p.grad) for p, buffer in zip(self.params, self.grads)
                 if p.grad is not None and p.grad is not buffer]
        if fresh:
            torch._foreach_zero_(fresh)
        if moved:
            torch._foreach_copy_(*map(list, zip(*moved)))
        for p, buffer in zip(self.params, self.grads):
            p.grad = buffer

    def captured(self, buffers: dict):
        """A graph of body() on these buffers, or None (and eager steps from then on) when it cannot be captured.

        Before the first capture one eager run on a side stream sets up what is set up lazily (cuBLAS workspaces,
        kernel choices); later shapes need none, and skipping it keeps that run's memory from sitting, cached for
        the side stream, next to the graphs' memory."""
        torch.cuda.synchronize()  # the GPU's queued work is no part of the capture (torch.cuda.graph waits for it too)
        start = time.perf_counter()
        if not self.captures:
            kept = [p.grad for p in self.params]
            for p in self.params:  # the warm-up's gradients are thrown away
                p.grad = None
            self.warm_up_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.warm_up_stream):
                self.body(buffers)
            torch.cuda.current_stream().wait_stream(self.warm_up_stream)
            for p, grad in zip(self.params, kept):
                p.grad = grad
        self.attach_gradients()
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the DataLoader's pin-memory thread keeps calling CUDA while this thread captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                loss = self.body(buffers)
        except RuntimeError as error:  # out of memory, or an operation a graph cannot hold
            failure = str(error).splitlines()[0]
        else:
            self.captures, self.capture_s = self.captures + 1, self.capture_s + time.perf_counter() - start
            return graph, loss
        # Out here, not in the except block, whose traceback would keep the graphs' memory referenced.
        self.release(failure)
        return None

    def release(self, why: str):
        """Graphs off for the rest of the run, their memory (and the gradient buffers') handed back."""
        self.failed = why
        self.shapes.clear()
        memory.free_cached()

    def step(self, inputs, denominator, min_rows: int = 0) -> torch.Tensor | None:
        """Forward, loss (divided by `denominator`) and backward of one batch; returns the loss, or None when the
        batch could not be captured (the caller runs it eagerly). min_rows: labelled positions to make room for."""
        embeds = self.embeddings(inputs)
        length = -(-embeds.shape[1] // LENGTH_MULTIPLE) * LENGTH_MULTIPLE
        rows = -(-max(len(inputs["answer_positions"]), min_rows) // ROWS_MULTIPLE) * ROWS_MULTIPLE
        shape = (len(embeds), length, rows)
        if shape not in self.shapes:
            roomier = [s for s in self.shapes if s[:2] == shape[:2] and s[2] > rows]
            if roomier:  # its padded rows cost about 1 ms per 512; a capture, 200 ms
                shape = min(roomier)
            else:
                self.shapes[shape] = [self.new_buffers(length, rows, embeds), None, None]
        entry = self.shapes[shape]
        self.fill(entry[0], inputs, embeds, denominator)
        if self.capture and entry[1] is None:
            graph = self.captured(entry[0])
            if graph is None:
                return None
            entry[1:] = graph
        self.attach_gradients()
        if entry[1] is None:
            return self.body(entry[0])
        entry[1].replay()
        return entry[2].clone()

    def finish(self, model):
        """After training: the gradient buffers and the graphs' memory go back before evaluation generates."""
        model.zero_grad(set_to_none=True)
        self.grads.clear()
        self.release("training is over")
