"""Peak resident memory of a block of work, sampled every millisecond from /proc/self/statm (Linux).
`rss` counts every resident page; `private_rss` leaves out file-backed ones (memory-mapped safetensors
files: page cache, which the kernel can drop)."""

import os
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def _statm() -> list[int]:
    with open("/proc/self/statm") as f:
        return [int(field) * PAGE for field in f.read().split()]


def rss() -> int:
    return _statm()[1]


def private_rss() -> int:
    _, resident, shared, *_ = _statm()
    return resident - shared


class PeakRSS:
    """The peaks of `rss()` (.peak) and `private_rss()` (.peak_private) while the block runs."""

    def __enter__(self):
        self.peak, self.peak_private, self._running = rss(), private_rss(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _update(self):
        _, resident, shared, *_ = _statm()
        self.peak, self.peak_private = max(self.peak, resident), max(self.peak_private, resident - shared)

    def _sample(self):
        while self._running:
            self._update()
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self._update()
