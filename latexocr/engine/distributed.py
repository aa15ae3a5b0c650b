"""The processes of a data-parallel run (torchrun, accelerate launch): who they are, and what they agree on.

torchrun and accelerate launch start one process per GPU and tell each where it stands in RANK, WORLD_SIZE and
LOCAL_RANK. One process alone is the same with rank 0 of 1, and every helper here is then a no-op.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

# Waiting for the first process of a machine to download the model: a 17 GB download can outlast NCCL's default
# 10 minutes. The wait runs over a CPU (gloo) group with this timeout; the training collectives keep the default.
DOWNLOAD_TIMEOUT = datetime.timedelta(hours=3)


@dataclass
class Processes:
    rank: int = 0  # this process among all
    world_size: int = 1  # processes in all
    local_rank: int = 0  # this process's GPU on its machine
    download_group: object = None  # the gloo group main_process_first waits on

    @property
    def main(self) -> bool:
        """The one process that prints, tracks, saves and scores."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1


def from_environment() -> Processes:
    return Processes(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                     int(os.environ.get("LOCAL_RANK", "0")))


def start(processes: Processes, on_gpu: bool) -> None:
    """Join the process group (made here rather than by the Trainer, which takes it over, so that the model is
    downloaded once per machine first and the memory probe can agree on one micro-batch for all processes)."""
    if not processes.several:
        return
    torch.distributed.init_process_group("nccl" if on_gpu else "gloo",
                                         device_id=torch.device("cuda", processes.local_rank) if on_gpu else None)
    processes.download_group = torch.distributed.new_group(backend="gloo", timeout=DOWNLOAD_TIMEOUT)


@contextlib.contextmanager
def main_process_first(processes: Processes):
    """The first process of each machine runs the block first (downloading the model, building the tiny one); the
    machine's other processes then find the files in place instead of writing the same files at the same time."""
    if processes.several and processes.local_rank != 0:
        torch.distributed.barrier(group=processes.download_group)
    yield
    if processes.several and processes.local_rank == 0:
        torch.distributed.barrier(group=processes.download_group)


def smallest(processes: Processes, value: int, device) -> int:
    """The smallest of each process's value (each process's own when alone)."""
    if not processes.several:
        return value
    found = torch.tensor(value, device=device)
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MIN)
    return int(found)


def gathered(processes: Processes, value) -> list:
    """Every process's value, in rank order."""
    if not processes.several:
        return [value]
    values = [None] * processes.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def stop(processes: Processes) -> None:
    """The work that needs all processes ends here; rank 0 goes on alone."""
    if processes.several and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
