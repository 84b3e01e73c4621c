"""How much memory one restore program needs (XLA's own accounting) and how much is free.

The need is read from the compiled program (`jax.jit(f).lower(...).compile().memory_analysis()`:
temporaries, output and inputs, without the weights, which are resident anyway). It is exact for
a compiled shape and, since a convolutional or channel-attention network's buffers grow with the
number of pixels, extrapolated per pixel to shapes too large to be worth compiling.

The free memory is the accelerator's (`bytes_limit - bytes_in_use` of `Device.memory_stats()`),
or on a CPU, which reports none, the host's available memory (`MemAvailable`).
"""

import os
from typing import Any

GIB = float(2**30)


def free_bytes(device: Any) -> tuple[int, str]:
    """`(bytes free for new buffers on device, where that number comes from)`."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        stats = None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return max(free, 0), f"{device.device_kind} {device.id}"
    return host_available_bytes(), "host memory (MemAvailable)"


def host_available_bytes() -> int:
    """The kernel's estimate of memory available without swapping (Linux), else free pages."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def program_bytes(compiled: Any, *, resident_bytes: int) -> int | None:
    """Bytes a compiled program needs beyond `resident_bytes` of its arguments (the weights).

    Returns:
      temporaries + outputs + arguments - aliased - resident, or None when the backend gives no
      memory accounting.
    """
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if analysis is None:
        return None
    total = (
        analysis.temp_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.argument_size_in_bytes
        - analysis.alias_size_in_bytes
    )
    return max(int(total) - int(resident_bytes), 0)


def gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.2f} GiB"
