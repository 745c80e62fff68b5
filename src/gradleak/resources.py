"""Memory checks made before a large allocation, so that a size the schema allows but the machine
cannot hold is one clear error naming the key, not an allocator traceback or the OOM killer."""

from __future__ import annotations

import os

from gradleak.errors import ConfigError

FLOAT32 = 4


def available_bytes() -> int:
    """Memory this process can still take: the kernel's MemAvailable, else the physical total."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        return 1 << 62  # unknown: do not refuse


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


# The share of the available memory one allocation may plan on (the rest: the other copies a run
# holds, and the system).
SHARE = 0.8


def check_fits(nbytes: float, what: str, key: str, advice: str) -> None:
    """Refuse, naming ``key``, work that needs more than ``SHARE`` of the memory available."""
    free = available_bytes()
    if nbytes > SHARE * free:
        raise ConfigError(
            key,
            f"{what} need about {_gib(nbytes)}, more than {SHARE:.0%} of the {_gib(free)} "
            f"of memory available: {advice}",
        )


def check_images_fit(count: int, channels: int, size: int, copies: int = 3) -> None:
    """``count`` float32 images of ``channels`` x ``size`` x ``size`` (``copies`` at once while
    they are converted, resized and split)."""
    check_fits(
        copies * count * channels * size * size * FLOAT32,
        f"{count} images of {channels} x {size} x {size}",
        "data.image_size",
        "use a smaller image_size",
    )
