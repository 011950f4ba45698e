"""What every benchmark records: the machine, and a process's memory (current and peak RSS, sampled)."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import threading
import time


def machine() -> dict:
    import torch

    mem_kb = 0
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        pass
    return {
        "platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
        "memory_gb": round(mem_kb / 2**20, 1), "python": platform.python_version(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available(),
    }


def rss_mb(pid: int | str = "self") -> float:
    """Resident set size now (Linux /proc)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's lifetime peak RSS."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Give freed heap pages back to the OS (glibc), so a later RSS rise measures new allocations, not reuse."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakSampler:
    """Samples this process's RSS every `interval_s` in a thread: the peak over a block of code, which the
    lifetime peak (getrusage) cannot give once model loading has set a higher one."""

    def __init__(self, interval_s: float = 0.005):
        self.interval_s, self.peak, self.baseline = interval_s, 0.0, 0.0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakSampler":
        release_free_memory()
        self.baseline = self.peak = rss_mb()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mb())
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def growth_mb(self) -> float:
        return self.peak - self.baseline
