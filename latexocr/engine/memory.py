"""GPU memory: what a forward and backward of the longest samples needs, found by trying (the probe)."""

import gc

import torch

from latexocr.engine import distributed

SLACK_BYTES = 2**29  # kept free beyond the optimizer's state: 0.5 GiB for the allocator's rounding and the CUDA graphs


def free_cached():
    """Hand memory no tensor holds any more back to the GPU (for the next probe, a graph, or generation)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def optimizer_bytes(trainable_parameters: int) -> int:
    """GPU memory to keep free for AdamW's two fp32 moments (made at the first step) and some slack."""
    return 2 * 4 * trainable_parameters + SLACK_BYTES


def divisors_down(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def fits(model, loss, batch: dict, reserve_bytes: int, device: str) -> bool:
    """Whether a forward and backward of this batch fit in GPU memory with reserve_bytes left over."""
    batch = {k: v.to(device) for k, v in batch.items()}
    try:
        reserve = torch.empty(reserve_bytes, dtype=torch.uint8, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss(model, batch).backward()
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        batch = reserve = None  # dropped before the cache is emptied, so their memory goes back too
        model.zero_grad(set_to_none=True)
        free_cached()


def largest_fitting_micro_batch(model, loss, batches, longest_first: list, per_device_batch: int, reserve_bytes: int,
                                device: str, processes: distributed.Processes) -> int | None:
    """The largest micro-batch (a divisor of the per-GPU batch, so accumulation keeps the batch size) whose forward
    and backward on the longest samples fit in GPU memory, leaving reserve_bytes for the optimizer state; None when
    not even one sample fits. `batches` makes a batch of samples (the training collator).

    With several processes it is the smallest any of them found: every process must use the same one, or with
    different gradient accumulation they would synchronise gradients at different forward passes."""
    micro = next((m for m in divisors_down(per_device_batch)
                  if fits(model, loss, batches(longest_first[:m]), reserve_bytes, device)), None)
    return distributed.smallest(processes, micro or 0, device) or None


def headroom(device: str, limit_bytes: int) -> int:
    """Bytes still free for this process: under its own cap (GPU_MEMORY_GIB) and on the device."""
    return min(limit_bytes - torch.cuda.memory_reserved(device), torch.cuda.mem_get_info(device)[0])
