"""Data parallelism across processes (torchrun / accelerate launch): a differentiable all-gather so
that the in-batch negatives are the *global* batch, gradient averaging, and sharded item embedding
gathered back in item order. Everything is a no-op in a single process.

Why not DistributedDataParallel's wrapper: a training step makes four forward passes (text and image
prompts of histories and targets) before one backward, which DDP's reducer does not accept without
static-graph tricks; averaging the LoRA gradients explicitly after the backward is the same update.
"""
from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def free_port() -> int:
    """A TCP port free on this machine now: where a benchmark or a test starts a process group of
    local processes itself."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch --multi_gpu) started this process as one of
    several (its environment says WORLD_SIZE > 1), joined or not yet."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_rank() -> int:
    """This process's rank on its machine (the launcher's LOCAL_RANK; 0 without a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env() -> bool:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE > 1): NCCL for
    CUDA tensors and gloo for CPU tensors (:func:`backend`). Each rank uses cuda:LOCAL_RANK when
    there are GPUs.

    A process that joined and then fails must leave at once: its peers wait in a collective it
    will never enter, and only the launcher, seeing one process end with an error, stops them. So
    an uncaught exception prints its traceback and ends the process (exit code 1) before Python's
    exit handlers, whose :func:`shutdown` would wait in a barrier for peers that never come."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return is_distributed()
    if torch.cuda.is_available() and local_rank() < torch.cuda.device_count():  # (more processes than GPUs:
        torch.cuda.set_device(local_rank())  # see backbones.backbone_device, which refuses them a GPU)
    dist.init_process_group(backend=backend(torch.cuda.is_available()))
    atexit.register(shutdown)  # a process group left alive at exit can abort the interpreter's teardown
    sys.excepthook = _exit_after(sys.excepthook)
    return True


def backend(cuda: bool) -> str:
    """The process group's backends: on GPUs NCCL for CUDA tensors and gloo for CPU tensors (NCCL
    alone has no CPU collectives, and the sharded item embeddings are gathered on the CPU); gloo
    alone without GPUs."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


def _exit_after(hook):
    """``hook`` (an excepthook), then an immediate exit: 1, or 130 after Ctrl-C (see :func:`init_from_env`)."""
    def report_and_exit(kind, value, tb):
        hook(kind, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130 if issubclass(kind, KeyboardInterrupt) else 1)

    return report_and_exit


def launcher_warnings(env=None) -> list[str]:
    """What ``accelerate launch`` was asked that this project does not take from it. accelerate hands
    its ``--mixed_precision`` and ``--dynamo_backend`` to the script through the environment, for
    its own ``Accelerator`` to read; here the backbone computes in its own dtype (bf16 autocast on
    GPUs, fp32 on CPUs) and compiling is ``--compile``'s. Said once, rather than silently ignored."""
    env = os.environ if env is None else env
    notes = []
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if precision not in ("", "no"):
        notes.append(f"accelerate launch --mixed_precision {precision} is not used: the backbone computes in its "
                     "own dtype (bf16 on GPUs, fp32 on CPUs)")
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").strip().lower()
    if dynamo not in ("", "no"):
        notes.append(f"accelerate launch --dynamo_backend {dynamo} is not used: --compile compiles the decoder "
                     "layers (auto by default: see train --help)")
    return notes


def shutdown() -> None:
    """Leave the process group (after a barrier, so no rank tears down while another still talks)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def finish(code: int) -> int:
    """End a process that joined a process group: leave the group (after a barrier, when ``code`` is
    0), flush, and exit at once with ``code``. A failed process (``code`` not 0) does not wait in the
    barrier: its peers may be waiting in a collective it will never enter, and the launcher stops
    them when it sees this process end. With gloo, the interpreter's own teardown after a finished
    run sometimes aborts in C++ static destructors ("terminate called without an active exception":
    no Python frame, about one run in ten on CPU), turning a finished run into exit code -6; a
    direct exit skips that teardown. Without a process group, returns ``code``."""
    if not is_distributed():
        return code
    if code == 0:
        shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape on each) along dim 0, in rank order. Differentiable:
    the backward hands each rank the gradient of its own rows, summed over ranks."""
    if not is_distributed():
        return x
    import warnings

    from torch.distributed.nn.functional import all_gather  # differentiable; present in every torch 2.x

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(all_gather(x), dim=0)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def average_tensors(tensors, like=None) -> list:
    """Sum over ranks, divided by the world size (see :func:`average_gradients`). With ``like`` (a
    list of the same length), a None entry (no gradient) counts as zeros shaped like its ``like``
    entry, on its device, so that every rank reduces the same buffers where NCCL needs them."""
    tensors = list(tensors)
    if like is not None:
        tensors = [torch.zeros_like(ref) if t is None else t for t, ref in zip(tensors, like, strict=True)]
    if not is_distributed():
        return tensors
    if any(t is None for t in tensors):
        raise ValueError("average_tensors: a None entry needs `like` across processes")
    out = [t.detach().clone() for t in tensors]
    all_reduce_mean(out)
    return out


def average_gradients(params) -> None:
    """After a backward on the replicated global loss, rank r holds W · ∂L/∂θ through its own rows;
    summing over ranks and dividing by W gives exactly the single-process gradient."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_mean([p.grad for p in params])


def broadcast_from_first(tensors) -> None:
    """Overwrite ``tensors`` in place with rank 0's values (in buckets, like the averaging). A
    trainer's adapter and α/β start from rank 0's: processes whose random streams differed before
    the adapter was made (one built the tiny backbone, drawing numbers, while another found it
    built) would otherwise start, and stay, apart."""
    if not is_distributed():
        return
    with torch.no_grad():
        _in_buckets(list(tensors), lambda flat: dist.broadcast(flat, src=0))


def all_reduce_mean(tensors: list, bucket_elements: int = 1 << 26) -> None:
    """Average ``tensors`` over ranks in place, as few collectives as possible: the tensors of one
    dtype and device are flattened into buckets of at most ``bucket_elements`` (256 MB of fp32) and
    each bucket is reduced in one call. The LoRA of a 3B model is about 500 tensors; one call each
    would pay a collective's fixed latency 500 times a step. Elementwise the sums are the same."""
    w = world_size()
    if any(not t.is_floating_point() for t in tensors):
        raise TypeError("averaging over processes needs floating-point tensors")

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(w)

    _in_buckets(tensors, mean, bucket_elements)


def _in_buckets(tensors: list, collective, bucket_elements: int = 1 << 26) -> None:
    """Apply ``collective`` (in place on a flat tensor) to ``tensors``: those of one dtype and device
    flattened into buckets of at most ``bucket_elements``, one call a bucket, copied back."""
    open_: dict[tuple, tuple[list[int], int]] = {}  # (dtype, device) -> (the bucket being filled, its size)
    buckets = []
    for i, t in enumerate(tensors):
        key = (t.dtype, t.device)
        idx, size = open_.get(key, (None, 0))
        if idx is None or size + t.numel() > bucket_elements:
            idx, size = [], 0
            buckets.append(idx)
        idx.append(i)
        open_[key] = (idx, size + t.numel())
    for idx in buckets:
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        collective(flat)
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            tensors[i].copy_(part.view_as(tensors[i]))


def shard(n: int) -> range:
    """This rank's contiguous share of ``range(n)`` (sizes differ by at most one)."""
    return range(*_bounds(n, world_size(), rank()))


def gather_shards(local: torch.Tensor, n: int) -> torch.Tensor:
    """Rows embedded per :func:`shard` -> all ``n`` rows in order, on every rank."""
    if not is_distributed():
        return local
    w = world_size()
    return torch.cat(gather_varying(local, [len(range(*_bounds(n, w, r))) for r in range(w)]), dim=0)


def gather_varying(local: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """Every rank's ``local`` (``sizes[r]`` rows on rank r, the other dimensions alike), in rank
    order, on the device ``local`` is on (padded to the largest for the one all-gather)."""
    if not is_distributed():
        return [local]
    padded = local.new_zeros(max(sizes), *local.shape[1:])
    padded[: len(local)] = local
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return [o[:s] for o, s in zip(out, sizes)]


def _bounds(n: int, w: int, r: int) -> tuple[int, int]:
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()
