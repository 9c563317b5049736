"""Work spread over the processes of a torch.distributed group: who this process is, its share of the
windows, and sums across ranks taken in a fixed order.

layerwise runs data-parallel: every rank holds the whole model (layer by layer, as on one process), reads
its own share of the calibration and evaluation windows, and the statistics those windows produce (Hessians,
Fisher vectors, damages, log-likelihoods) are summed over ranks before anyone uses them. Every rank then
makes the same decisions from the same numbers, so only rank 0 needs to write.

Sums are taken in a fixed order: each rank's part is sent to rank 0, added there in rank order in float64,
and the sum is sent back, so the result is the same on every rank and from run to run whatever the timing
(an all-reduce's order is the backend's); each rank sends one tensor and receives one. Rank 0 receives the
ranks' parts one at a time (`fold_at_main`), so its memory does not grow with the number of ranks. Sums whose
bits must not depend on how the terms were split among ranks either (the Hessians) are
`layerwise.core.summation`'s, built on the same two steps. Per-window numbers (the activation scorers' cosine
and loss sums) are summed exactly over every rank's windows and rounded once (`exact_sums`), which has the
same property.

Windows are dealt round-robin (rank r gets windows r, r + N, ...), so the first k windows of the whole set
are the first k / N of each share: a scorer that reads a leading subset reads the same windows on N ranks
as on one.

Ranks that run on one machine's CPU share its cores (`pools_threads`). Work that one process's threads
already split well (RTN, planning) gains nothing from being split among them, and pays their messages: it is
done instead by rank 0 alone with every local rank's threads (`on_main`, `pooled_threads`) while the others
wait idle, and its result is sent to them. The forwards stay split by windows (measured faster than pooled),
GPTQ's sweeps stay dealt (threads barely speed up their column steps), and on GPUs or across machines
everything is split.

Without an initialised process group (or with one process) every function here is the identity.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from layerwise.core.errors import LayerwiseError

T = TypeVar("T")

# Environment variables torchrun sets for every worker.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: `rank` of `world`, `local_rank` on its node, the `backend`."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


# Whether this process is doing work of the group by itself (`on_main`): inside, it runs as if alone.
_alone_for_now = False


def ranks() -> Ranks | None:
    """The group this process runs in, or None when it runs alone (no group, a group of one, or work that rank 0
    does for the group by itself, `on_main`)."""
    if _alone_for_now or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return Ranks(dist.get_rank(), dist.get_world_size(), local, str(dist.get_backend()))


def is_alone() -> bool:
    """Whether this process runs without others (no group, or a group of one)."""
    return ranks() is None


def is_main() -> bool:
    """Whether this process writes (rank 0, or the only process)."""
    group = ranks()
    return group is None or group.main


def launched() -> bool:
    """Whether this process was started by torchrun (or an equivalent launcher) as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# Whether `init_from_environment` started this process's group (not a caller of `layerwise.compress`).
_joined_here = False


def init_from_environment(device: torch.device | None = None) -> Ranks | None:
    """Join the group torchrun describes in the environment, once: nccl when this rank runs on a CUDA device,
    gloo otherwise. Returns None when not launched as one of several processes. An already initialised
    group (`layerwise.compress` called inside one) is used as it is."""
    if dist.is_available() and dist.is_initialized():
        return ranks()
    if not launched():
        return None
    missing = [v for v in LAUNCH_VARIABLES if v not in os.environ]
    if missing:
        raise LayerwiseError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} are not set; "
                             "start the processes with torchrun --nproc-per-node N -m layerwise ...")
    cuda = device is not None and device.type == "cuda"
    backend = "nccl" if cuda else "gloo"
    kwargs: dict[str, Any] = {}
    if cuda:
        kwargs["device_id"] = device
    dist.init_process_group(backend, **kwargs)
    global _joined_here
    _joined_here = True
    return ranks()


def leave() -> None:
    """Leave the group `init_from_environment` joined, as a finished program should: a gloo process that exits
    still in its group can abort in its teardown ("terminate called without an active exception", seen on
    one rank of a test). A group a caller started is theirs to leave."""
    global _joined_here
    if _joined_here and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _joined_here = False


def local_device(device: torch.device) -> torch.device:
    """This rank's own CUDA device (``cuda:LOCAL_RANK``) when `device` is CUDA without an index under torchrun."""
    if device.type == "cuda" and device.index is None and launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def share(n: int) -> range:
    """The indices of `n` windows this rank reads: every N-th, starting at its rank."""
    group = ranks()
    return range(n) if group is None else range(group.rank, n, group.world)


def shareable(n: int) -> bool:
    """Whether `n` windows leave every rank at least one (always, alone)."""
    group = ranks()
    return group is None or n >= group.world


def check_shareable(n: int, what: str = "windows", flag: str = "--calib-windows") -> None:
    """Refuse, on every rank alike, `n` windows that would leave some rank without one."""
    group = ranks()
    if group is not None and not shareable(n):
        raise LayerwiseError(f"{n} {what} cannot be shared by {group.world} processes; give at least {group.world} "
                             f"({flag}) or run fewer processes")


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's share of `windows` (rows r, r + N, ...). Refuses a share that would be empty."""
    group = ranks()
    if group is None:
        return windows
    check_shareable(windows.shape[0])
    return windows[group.rank::group.world]


def local_count(n: int) -> int:
    """How many of the first `n` windows (of the whole set) are in this rank's share."""
    return len(share(n))


def fold_at_main(parts: list[torch.Tensor], fold: Callable[[list[torch.Tensor]], None]) -> None:
    """On rank 0, `fold(other)` with every other rank's `parts`, rank by rank in rank order; the other ranks send
    theirs. Each rank passes tensors of the same shapes and dtypes. Rank 0 holds one rank's parts at a time, so
    its memory does not grow with the number of ranks. Nothing happens on one process."""
    group = ranks()
    if group is None:
        return
    device = _communication_device(parts[0])
    if not group.main:
        for part in parts:
            dist.send(part.detach().to(device).contiguous(), dst=0)
        return
    buffers = [torch.empty(part.shape, dtype=part.dtype, device=device) for part in parts]
    for rank in range(1, group.world):
        for buffer in buffers:
            dist.recv(buffer, src=rank)
        fold([buffer.to(part.device) for buffer, part in zip(buffers, parts, strict=True)])


def broadcast_from_main(tensors: list[torch.Tensor]) -> None:
    """Fill every rank's `tensors` (of the same shapes and dtypes everywhere) with rank 0's, in place."""
    if ranks() is None:
        return
    for tensor in tensors:
        device = _communication_device(tensor)
        message = tensor.detach().to(device).contiguous()
        dist.broadcast(message, src=0)
        if message.data_ptr() != tensor.data_ptr():
            tensor.copy_(message)


def sum_in_order(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of `tensor`, added at rank 0 in rank order in float64 and sent back to every rank in
    `tensor`'s dtype and device: one tensor-sized message from and to each rank."""
    group = ranks()
    if group is None:
        return tensor
    total = torch.zeros_like(tensor, dtype=torch.float64) if group.main else None

    def add(part: list[torch.Tensor]) -> None:
        assert total is not None
        total.add_(part[0].double())

    if total is not None:
        add([tensor.detach()])
    fold_at_main([tensor], add)
    local = total.to(tensor.dtype) if total is not None else torch.empty_like(tensor)
    broadcast_from_main([local])
    return local


def sum_floats(values: list[float]) -> list[float]:
    """Each value summed over ranks (fixed order, float64)."""
    if ranks() is None:
        return list(values)
    return sum_in_order(torch.tensor(values, dtype=torch.float64)).tolist()


def exact_sums(rows: list[list[float]], width: int, across_ranks: bool = True) -> list[float]:
    """Column sums of `rows` (one row of `width` numbers per window, say), with every rank's rows when
    `across_ranks`: each sum exact, then rounded once (`math.fsum`), so the same rows give the same bits in any
    order and however they are split among ranks. Every rank gets the sums; the rows travel as one gathered
    object (a few numbers per window)."""
    if across_ranks:
        rows = [row for part in gather_all(rows) for row in part]
    return [math.fsum(row[i] for row in rows) for i in range(width)]


def deal(costs: list[float]) -> list[int]:
    """The rank that does each of several independent jobs of the given `costs`: the costliest first, each to
    the rank with the least work so far (the lowest such rank on a tie). Every rank computes the same answer
    from the same costs; alone, rank 0 does everything."""
    group = ranks()
    owners = [0] * len(costs)
    if group is None:
        return owners
    load = [0.0] * group.world
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        owner = min(range(group.world), key=lambda r: (load[r], r))
        owners[job] = owner
        load[owner] += costs[job]
    return owners


def broadcast_from_owners(tensors: list[torch.Tensor], owners: list[int]) -> None:
    """Fill every rank's `tensors[i]` with its owner's (`owners[i]`): each rank passes tensors of the same shapes
    and dtypes, the owner's holding the values. One message per owning rank: its tensors' bytes, concatenated."""
    group = ranks()
    if group is None:
        return
    for owner in range(group.world):
        mine = [t for t, o in zip(tensors, owners, strict=True) if o == owner and t.numel()]
        if not mine:
            continue
        device = _communication_device(mine[0])
        if group.rank == owner:
            message = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8).to(device) for t in mine])
        else:
            message = torch.empty(sum(t.numel() * t.element_size() for t in mine), dtype=torch.uint8, device=device)
        dist.broadcast(message, src=owner)
        if group.rank != owner:
            offset = 0
            for t in mine:
                size = t.numel() * t.element_size()
                t.copy_(message[offset:offset + size].view(t.dtype).reshape(t.shape))
                offset += size


def from_owners(owners: list[int], work: Callable[[int], list[torch.Tensor]],
                placeholders: Callable[[int], list[torch.Tensor]], *, pooled: bool = False) -> list[list[torch.Tensor]]:
    """Each job's tensors on every rank: job i is done by its owner, `owners[i]` (`work(i)`), while the other
    ranks make `placeholders(i)` (the same shapes and dtypes), filled from the owner (`broadcast_from_owners`).
    `pooled`: the owners do their jobs with every local rank's threads (`pooled_threads`), for work given to
    rank 0 alone while the others wait. Alone, `work(i)` for every job."""
    group = ranks()
    if group is None:
        return [work(i) for i in range(len(owners))]
    with pooled_threads() if pooled and group.rank in owners else nullcontext():
        parts = [work(i) if owner == group.rank else placeholders(i) for i, owner in enumerate(owners)]
    broadcast_from_owners([t for part in parts for t in part],
                          [owner for part, owner in zip(parts, owners, strict=True) for _ in part])
    return parts


@contextmanager
def warnings_shared() -> Iterator[None]:
    """Warnings raised in the block on any rank are raised again on every rank, in rank order, when it ends.

    For work dealt among the ranks (`deal`): only rank 0 shows warnings, and it must see those of the jobs the
    other ranks did. Alone, warnings pass through untouched.
    """
    if ranks() is None:
        yield
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    mine = [(str(w.message), w.category, w.filename, w.lineno) for w in caught]
    for message, category, filename, lineno in (w for part in gather_all(mine) for w in part):
        warnings.warn_explicit(message, category, filename, lineno)


def gather_along_first(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (a scalar counts as one row), concatenated in rank order along the first dimension,
    on every rank: what lm-eval expects of a data-parallel model's ``all_gather``."""
    group = ranks()
    rows = tensor.reshape(1) if tensor.ndim == 0 else tensor
    if group is None:
        return rows
    local = rows.detach().to(_communication_device(rows)).contiguous()
    parts = [torch.empty_like(local) for _ in range(group.world)]
    dist.all_gather(parts, local)
    return torch.cat(parts).to(tensor.device)


def gather_all(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order, on every rank; ``[value]`` alone."""
    if ranks() is None:
        return [value]
    seen: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(seen, value)
    return seen


def from_main(value: Any) -> Any:
    """Rank 0's `value` (any picklable object), on every rank."""
    if ranks() is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(what: str, value: Any) -> None:
    """Refuse, on every rank, a run whose ranks were given different `value`s (arguments, model files)."""
    group = ranks()
    if group is None:
        return
    seen = gather_all(hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest())
    differ = [r for r, d in enumerate(seen) if d != seen[0]]
    if differ:
        raise LayerwiseError(f"ranks {', '.join(map(str, differ))} were given other {what} than rank 0; start "
                             "every process with the same command and the same model files")


# The key in the group's store that counts the ranks that reported an error: the first one prints it.
_ERROR_KEY = "layerwise/errors"


def claim_error() -> bool:
    """Whether this rank is the first of its group to report an error, so the one to print it (always True
    alone, or when the group's store cannot be reached)."""
    if ranks() is None:
        return True
    try:
        return dist.distributed_c10d._get_default_store().add(_ERROR_KEY, 1) == 1
    except Exception:  # the store went with a dead rank: say it rather than nothing
        return True


def error_reported() -> bool:
    """Whether some rank of the group already reported an error (see `claim_error`)."""
    if ranks() is None:
        return False
    try:
        return dist.distributed_c10d._get_default_store().add(_ERROR_KEY, 0) > 0
    except Exception:
        return False


def is_peer_failure(exc: BaseException) -> bool:
    """Whether `exc` is a collective failing because another process of the group stopped."""
    if ranks() is None:
        return False
    text = str(exc)
    return isinstance(exc, dist.DistError) or (
        isinstance(exc, RuntimeError) and ("Connection closed by peer" in text or "gloo" in text.lower()))


def where() -> str:
    """``rank R: `` inside a group of several processes, else nothing: the prefix of this rank's messages."""
    group = ranks()
    return "" if group is None else f"rank {group.rank}: "


# `local_ranks`'s count for the group it was taken in, when it had to ask every rank.
_local_count: tuple[Any, int] | None = None


def local_ranks() -> int:
    """How many ranks of the group run on this machine, this one included (1 alone): torchrun's
    LOCAL_WORLD_SIZE, else counted from every rank's host name, once per group (every rank must ask the first
    time)."""
    global _local_count
    group = ranks()
    if group is None:
        return 1
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    world = dist.distributed_c10d._get_default_group()
    if _local_count is None or _local_count[0] is not world:
        _local_count = (world, gather_all(socket.gethostname()).count(socket.gethostname()))
    return _local_count[1]


def pools_threads(device: torch.device) -> bool:
    """Whether work on `device` that threads split well (RTN, planning) is better done by rank 0 with every rank's
    threads than split among the ranks: when every rank of the group runs on this machine's CPU, so that the
    ranks share its cores. On the default model, 2 such ranks of one thread each took 1.6 times one process's
    time (2 threads) to quantize with RTN dealt among them, 0.98 to 1.3 times with rank 0 doing it on both
    threads (docs/RESULTS.md). Every rank gets the same answer."""
    group = ranks()
    return group is not None and device.type == "cpu" and group.backend == "gloo" and local_ranks() == group.world


@contextmanager
def pooled_threads() -> Iterator[None]:
    """Run the block with the torch threads of every rank on this machine (`local_ranks` times this rank's, at
    most the cores this process may use), for work this rank does while the others wait idle; a rank blocked
    in a collective uses no core (measured: 0.002 s of CPU in 0.7 s of waiting). Every rank must have called
    `pools_threads` (or `local_ranks`) before, so that this rank knows the count without asking the others."""
    saved = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or saved)
    torch.set_num_threads(max(saved, min(saved * local_ranks(), cores)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# How long a rank waits on the group's store between checks that rank 0 is still there (`on_main`).
MAIN_WAIT = timedelta(minutes=10)
_on_main_calls = 0


class MainFailed(dist.DistError):
    """Raised on the other ranks when the work rank 0 was doing for the group (`on_main`) raised there: rank 0
    reports the error itself. `refused`: it was a `LayerwiseError` (bad input), not a failure."""

    def __init__(self, message: str, refused: bool) -> None:
        super().__init__(message)
        self.refused = refused


def on_main(work: Callable[[], T]) -> T:
    """`work()`, done by rank 0 alone with every local rank's threads (`pooled_threads`), and its result (any
    picklable object) on every rank; the other ranks do not call `work` and wait idle.

    Inside `work`, rank 0 runs as if alone (`ranks()` is None), so that its sums, shards and dealing are one
    process's and the result has the bits of one process. The others wait on the group's store rather than in
    a collective, so that work longer than the group's timeout (30 minutes by default) does not end the run.
    If `work` raises, they raise `MainFailed`; if rank 0 dies, they see the store go and fail like any rank
    whose peer stopped. Alone, it is `work()`."""
    global _alone_for_now, _on_main_calls
    group = ranks()
    if group is None:
        return work()
    _on_main_calls += 1
    key = f"layerwise/on_main/{_on_main_calls}"
    store = dist.distributed_c10d._get_default_store()
    local_ranks()  # on every rank: `pooled_threads` reads the count
    if group.main:
        try:
            with pooled_threads():
                _alone_for_now = True
                result = work()
        except BaseException as exc:
            store.set(key, f"{int(isinstance(exc, LayerwiseError))}{type(exc).__name__}: {exc}")
            raise
        finally:
            _alone_for_now = False
        store.set(key, "")
        result = from_main(result)
        store.delete_key(key)  # every rank has read it: from_main is a collective
        return result
    while True:
        try:
            store.wait([key], MAIN_WAIT)
            break
        except dist.DistStoreError:  # a timeout: rank 0 is still working (a lost store raises DistNetworkError)
            continue
    failure = store.get(key).decode()
    if failure:
        raise MainFailed(f"rank 0 failed: {failure[1:]}", refused=failure[0] == "1")
    return from_main(None)


def barrier() -> None:
    if ranks() is not None:
        dist.barrier()


def _communication_device(tensor: torch.Tensor) -> torch.device:
    """Where a collective must see the tensor: on its CUDA device for nccl, on the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return tensor.device if tensor.device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
