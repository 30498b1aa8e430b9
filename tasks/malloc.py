"""glibc's malloc, tuned back for image and tensor work where Dask tuned it for memory release.

A Dask nanny starts its workers with ``MALLOC_TRIM_THRESHOLD_`` set (the
``distributed.nanny.pre-spawn-environ`` config), so that freed memory goes back to the OS.
Setting any such parameter turns off glibc's dynamic mmap threshold (mallopt(3)): every
allocation of 128 KiB or more then becomes a fresh ``mmap`` whose pages fault in one by one,
and freeing it unmaps them again. Decoded images, resized rows and encode buffers are that
size, so an ingest worker spent ~0.5 ms of system CPU per 144 px image on page faults
(``benchmarks/ingest.py``; 1.17 M minor faults for 5,000 images against 4 K without the
variable); a features worker ~4 ms per image in torch's activations (small_resnet, batch
32: 2.3-2.7 s of system CPU for 512 images, 0.2-0.4 s once tuned); and an ablation point
trained on a Dask worker ran ~30 % slower (batch 8 at 144 px, one thread: PANet 1.49 against
2.12 steps/s, MetaSegNet 1.04 against 1.45; 2.19 and 1.46 once tuned). This sets the two
thresholds where glibc's dynamic rule can settle at most: buffers up to `MMAP_THRESHOLD` stay
on the heap, and the heap's free top goes back to the OS beyond twice that; at the end of each
worker call (`large_buffers_on_heap`) ``malloc_trim`` hands back the rest of the free memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 32 * 2**20  # glibc's ceiling for its dynamic threshold on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
# Setting any of these turns the dynamic mmap threshold off (mallopt(3), M_MMAP_THRESHOLD).
_STATIC_PARAMETERS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_tuned = False


def keep_large_buffers_on_heap() -> bool:
    """Raise glibc's mmap and trim thresholds in this process when its environment fixed them
    at 128 KiB and less (a Dask worker's does), unless the user set ``MALLOC_MMAP_THRESHOLD_``
    themselves. Idempotent; returns whether they are (now) raised. A no-op off glibc."""
    global _tuned
    if _tuned:
        return True
    if (not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ
            or not any(name in os.environ for name in _STATIC_PARAMETERS)):
        return False
    try:
        libc = _libc()
        _tuned = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                      and libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    if _tuned:
        log.debug("malloc mmap threshold raised to %d bytes, trim threshold to twice that",
                  MMAP_THRESHOLD)
    return _tuned


@contextlib.contextmanager
def large_buffers_on_heap() -> Iterator[None]:
    """Run the block with `keep_large_buffers_on_heap` (which lasts for the process), then
    hand the heap's free memory back to the OS (``malloc_trim``), as Dask's setting meant: a
    worker keeps what it reuses while a task runs, not after it."""
    tuned = keep_large_buffers_on_heap()
    try:
        yield
    finally:
        if tuned:
            _libc().malloc_trim(0)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
