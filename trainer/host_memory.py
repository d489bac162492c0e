"""Host-memory setting of the training process.

glibc's malloc serves blocks below its dynamic mmap threshold (which rises up to 32 MiB as big
blocks are freed) from its heaps and keeps them there when freed. A training step of a large
model allocates and frees many such blocks (each layer's weight upcast for compute, activations),
and the heaps fragment: measured on real-width DiT blocks with --fp8_base, peak host memory grew
by about 0.2 bytes per model byte beyond the model itself. With blocks of 1 MiB and more mapped
on their own, a freed block goes straight back to the system.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 1 << 20


def map_large_allocations() -> bool:
    """Have glibc map every allocation of MMAP_THRESHOLD_BYTES or more; False where not glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError) as exc:
        log.debug("mallopt unavailable: %s", exc)
        return False
