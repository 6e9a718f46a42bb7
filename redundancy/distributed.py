"""Data-parallel sweeps: several processes (one per GPU) share each point's questions.

    accelerate launch --num_processes <GPUs> -m redundancy.sweep experiment=redundancy ...

Under a launcher (``WORLD_SIZE`` > 1 in the environment; accelerate's ``PartialState`` gives the
rank, the number of processes and this process's device) every process answers a disjoint shard
of the questions: the batches of the single-process run (fixed slices of ``batch_size``
questions), batch ``b`` to process ``b % world``, so every batch, and hence every answer, is the
one a single process computes. Each process appends its answers to its own partial file
(``partial/<key>.<tag>.jsonl``, :class:`redundancy.results.ResultStore`); after a barrier the
main process reads every shard's records back, as a single-process run resumes a crashed point,
and writes each point's row over the full question set. Without a launcher nothing here
initialises anything: one process answers everything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Processes:
    """This process's place among the processes of one sweep."""

    rank: int = 0
    world: int = 1
    device: torch.device | None = None  # the launcher's device for this process; None: a single process
    state: Any = None  # accelerate's PartialState when launched

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def tag(self) -> str | None:
        """The name of this process's partial files (None: a single process, the plain files)."""
        return f"rank{self.rank}of{self.world}" if self.distributed else None

    def wait(self) -> None:
        """Barrier: return when every process has reached it."""
        if self.state is not None:
            self.state.wait_for_everyone()

    def shard(self, items: Sequence[T], batch_size: int) -> list[T]:
        """This process's items: batch ``b`` of ``items`` (slices of ``batch_size``) when ``b % world == rank``."""
        return [x for i, x in enumerate(items) if (i // batch_size) % self.world == self.rank]


def processes() -> Processes:
    """The processes of this run: accelerate's view under a launcher, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes()
    from accelerate import PartialState

    # Without a GPU accelerate joins the processes only when told to run on the CPU (gloo).
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != world:
        raise RuntimeError(f"WORLD_SIZE={world} but accelerate sees {state.num_processes} process(es)")
    return Processes(
        rank=state.process_index, world=state.num_processes, device=torch.device(state.device), state=state
    )
