"""CPU work ahead of the accelerator: an ordered map over a thread pool with bounded lookahead.

Decoding, resizing and patchifying images can take longer than a GPU needs for the vision tower
itself (``bench/image_cache.py`` measures it). PIL and NumPy release the GIL in that work, so
threads scale it over the cores, and while they prepare the next images the calling thread keeps
the GPU busy with the current ones.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def default_workers(cap: int = 8) -> int:
    """This process's share of the cores it may use (divided among the processes torchrun started on
    this machine, ``LOCAL_WORLD_SIZE``), at most ``cap``."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    return max(1, min(cap, n // local))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, max_pending: int | None = None) -> Iterator[R]:
    """``fn(x)`` for each ``x`` of ``items``, yielded in order.

    With ``workers`` ≥ 1, computed by that many threads at most ``max_pending`` items (default twice the
    workers) ahead of the consumer, so memory stays bounded; with 0, in the calling thread as it
    asks (the plain serial path). An exception in ``fn`` is raised to the consumer when it reaches
    that item; work not yet started is cancelled when the consumer stops early.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    max_pending = max(1, max_pending or 2 * workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm2rec-prefetch")
    pending: deque = deque()
    source = iter(items)
    try:
        for x in source:
            pending.append(pool.submit(fn, x))
            if len(pending) >= max_pending:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
