"""Data parallelism for the heavy stages: shard items over processes, merge on rank 0 (docs/scaling.md §2).

``plan`` (rank 0 decides the to-do list), ``shard`` (each rank's contiguous slice), ``barrier``,
``gather``, ``is_main`` on accelerate's ``PartialState``; no-ops under plain ``python``. Used by
``stylize``, ``infer``, ``score`` and ``train``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from accelerate import PartialState

__all__ = ["barrier", "gather", "is_main", "main_first", "num_processes", "plan", "shard", "state", "total"]

T = TypeVar("T")


def state(device: str = "auto") -> PartialState:
    """The process group (accelerate's ``PartialState``), created on first use.

    ``device`` (``auto | cpu | cuda``, the ``models.device`` params) picks the backend on
    first use: gloo when the models run on CPU, else the accelerator's (NCCL, and each rank
    then gets its own GPU as the current device, so ``cuda`` means that rank's GPU).
    Stages call this before loading models; library functions reuse the group.
    """
    from accelerate import PartialState

    if PartialState._shared_state != {}:  # already created (a dict, or a thread-local one on XLA)
        return PartialState()
    from regionroute.models import resolve_device

    st = PartialState(cpu=resolve_device(device).type == "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and st.num_processes != world:  # every rank would do every item: refuse
        raise RuntimeError(f"launched as {world} processes but no process group formed ({st.distributed_type})")
    return st


def num_processes() -> int:
    return state().num_processes


def is_main() -> bool:
    """Rank 0 (the only one writing manifests, metrics, checkpoints and logs)."""
    return state().is_main_process


def barrier() -> None:
    """Wait until every process gets here (no-op for one process)."""
    state().wait_for_everyone()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's contiguous slice of ``items`` (``split_between_processes``; possibly empty)."""
    with state().split_between_processes(list(items)) as part:
        return list(part)


def gather(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order, on every rank (``gather_object``)."""
    from accelerate.utils import gather_object

    if state().num_processes == 1:
        return [obj]
    return list(gather_object([obj]))


def total(n: int) -> int:
    """Sum of ``n`` over the ranks."""
    return sum(gather(int(n)))


def plan(prepare: Callable[[], T]) -> T:
    """Run ``prepare`` on rank 0 only and give its (picklable) result to every rank.

    An exception raised by ``prepare`` (a one-line :class:`~regionroute.errors.UserError`,
    say) is raised on every rank, so that all of them stop the same way instead of the
    others waiting for rank 0 forever.
    """
    st = state()
    if st.num_processes == 1:
        return prepare()
    from accelerate.utils import broadcast_object_list

    box: list[Any] = [None]
    if st.is_main_process:
        try:
            box[0] = ("ok", prepare())
        except Exception as exc:  # re-raised on every rank below
            box[0] = ("error", exc)
    broadcast_object_list(box, from_process=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 of each machine runs the block first, then the others (model downloads and builds)."""
    with state().local_main_process_first():
        yield
