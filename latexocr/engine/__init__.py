"""The training engine train.py runs: each module one idea, taking its inputs as arguments.

    tuning.py        what trains: LoRA or every weight, on the language model and, if asked, the vision side
    preflight.py     every sample checked and measured before any weights load
    checkpoints.py   which checkpoint a run continues from, and whether it belongs to this run
    plan.py          the speed plan: vision cache, micro-batch, CUDA graphs, token budget, each with its reason
    batching.py      the collator: tokens, labels, rotary and answer positions worked out on the CPU
    loss.py          the loss on the answer only, the head applied only where a label is
    vision_cache.py  the frozen vision tower's outputs, computed once for all epochs
    graphs.py        each step's forward and backward captured and replayed as a CUDA graph
    memory.py        the memory probe: the largest micro-batch that fits
    kernels.py       fused kernels (Liger's op; LoRA's multiply-add; varlen vision attention), the one place that
                     reads library internals
    trainer.py       the Trainer subclass that runs all this, and its progress line
    distributed.py   the processes of a data-parallel run
    runtime.py       the device, torch's switches, timings and versions

With FAST=False train.py uses none of plan's speed-ups: the stock Trainer and the model's own loss.
"""
