"""Reusing CPU tensor memory from one training step to the next.

A training step frees and allocates again the same few dozen activation and gradient buffers (about
35-50 MB for the MNIST model at batch 128). glibc hands large freed blocks back to the OS, by ``munmap``
or by trimming the top of its heap, once they pass thresholds it adjusts as it goes; the next step then
faults the same memory back in, one zeroed 4 KiB page at a time. How often that happens depends on the
history of the heap: measured here, from none to about 4,000 page faults a step for the compiled bf16
step, and 1,250-1,650 for the eager one, which then ran 1.4x slower than without them
(benchmarks/RESULTS.md).

``reusing()`` makes vitlab's caching allocator (``csrc/reuse_allocator.cpp``) PyTorch's CPU allocator
for its duration: a freed block of 4 KiB or more is kept in a free list for its size and handed out
again, up to ``LIMIT_BYTES`` kept. On leaving, PyTorch's allocator is back; tensors made inside stay
valid, and the kept blocks are freed (unless ``keep``). It changes where memory comes from, not any
number a computation gives. ``fit`` and the time-budget probe train inside it.

The allocator is compiled on first use against the installed PyTorch's headers and libc10 (a C++
compiler is needed; under a second) and cached like vitlab's kernels (``vitlab.build``). Where it cannot
be built, or where ``VITLAB_REUSE_MEMORY=0``, ``reusing()`` changes nothing and yields False. The allocator
is one per process: a scope is process-wide, nested scopes share it, and ``clear`` empties it for all.
"""

from __future__ import annotations

import ctypes
import logging
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import build

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "reuse_allocator.cpp"
LIMIT_BYTES = 1 << 30  # the most freed memory kept for reuse; a block freed beyond it goes back to the C library

_lock = threading.Lock()
_library_state: dict[str, ctypes.CDLL | None] = {}
_depth = 0  # open reusing() scopes
error: str | None = None  # why the allocator could not be built, once a build failed


def enabled() -> bool:
    """False where the environment variable VITLAB_REUSE_MEMORY is 0 (or "false", "no", "off")."""
    return os.environ.get("VITLAB_REUSE_MEMORY", "1").strip().lower() not in ("0", "false", "no", "off")


def _build() -> ctypes.CDLL:
    if sys.platform == "win32":
        raise RuntimeError("the reusing allocator is built with a Unix C++ toolchain; none is used on Windows")
    flags = ("-O2", "-shared", "-fPIC", "-std=c++17") + build.torch_flags()
    lib = ctypes.CDLL(str(build.shared_library(SOURCE, "reuse_allocator", flags, key=build.torch_key(),
                                               libraries=("-lc10",))))
    lib.vitlab_reuse_enter.restype = ctypes.c_int
    lib.vitlab_reuse_exit.restype = None
    lib.vitlab_reuse_clear.restype = ctypes.c_size_t
    lib.vitlab_reuse_kept_bytes.restype = ctypes.c_size_t
    lib.vitlab_reuse_set_limit.argtypes = [ctypes.c_size_t]
    lib.vitlab_reuse_set_limit.restype = None
    lib.vitlab_reuse_active.restype = ctypes.c_int
    lib.vitlab_reuse_set_limit(LIMIT_BYTES)
    return lib


def _library() -> ctypes.CDLL | None:
    global error
    if "lib" not in _library_state:
        with _lock:
            if "lib" not in _library_state:
                try:
                    _library_state["lib"] = _build()
                except (OSError, RuntimeError, subprocess.SubprocessError) as failure:
                    _library_state["lib"], error = None, str(failure)
                    log.info("vitlab's reusing allocator is not available: %s", failure)
    return _library_state["lib"]


def available() -> bool:
    """Whether ``reusing()`` can take effect here: enabled, and built (the first call builds it; ``error``
    says why a build failed)."""
    return enabled() and _library() is not None


def active() -> bool:
    """Whether CPU tensors are being allocated by the reusing allocator now."""
    lib = _library_state.get("lib")
    return lib is not None and bool(lib.vitlab_reuse_active())


def kept_bytes() -> int:
    """Bytes of freed blocks kept for reuse now."""
    lib = _library_state.get("lib")
    return 0 if lib is None else lib.vitlab_reuse_kept_bytes()


def set_limit(limit_bytes: int) -> None:
    """Keep at most ``limit_bytes`` of freed blocks from now on (blocks kept already stay until ``clear``)."""
    if not isinstance(limit_bytes, int) or limit_bytes < 0:
        raise ValueError(f"expected limit_bytes to be an int >= 0; got {limit_bytes!r}")
    lib = _library()
    if lib is not None:
        lib.vitlab_reuse_set_limit(limit_bytes)


def clear() -> int:
    """Free every kept block; blocks freed from now on go back to the C library until the next scope
    opens. -> the bytes freed."""
    lib = _library_state.get("lib")
    return 0 if lib is None else lib.vitlab_reuse_clear()


@contextmanager
def reusing(keep: bool = False) -> Iterator[bool]:
    """Within the block, CPU tensor memory comes from the reusing allocator; yields whether it does.

    On leaving the outermost scope (also on an error) PyTorch's allocator is restored and, unless
    ``keep``, the kept blocks are freed. ``keep=True`` suits a scope opened around every step, as a
    benchmark does: the next scope finds the blocks still there. Yields False, changing nothing, where
    the allocator is not ``available`` or another allocator registered with PyTorch at a higher
    priority holds the place.
    """
    global _depth
    lib = _library() if enabled() else None
    on = False
    if lib is not None:
        with _lock:
            if _depth > 0 or lib.vitlab_reuse_enter():
                _depth += 1
                on = True
            else:
                log.info("vitlab's reusing allocator is not used: another CPU allocator holds a higher priority")
    try:
        yield on
    finally:
        if on:
            with _lock:
                _depth -= 1
                if _depth == 0:
                    lib.vitlab_reuse_exit()
                    if not keep:
                        lib.vitlab_reuse_clear()
