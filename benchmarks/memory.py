"""Peak resident memory of a block of work, sampled every millisecond from /proc/self/statm (Linux), and
the Qwen3-0.6B-shaped configuration the memory benchmarks load. `rss` counts every resident page;
`private_rss` leaves out file-backed ones (memory-mapped safetensors files: page cache, which the
kernel can drop)."""

import os
import threading
import time

from transformers import Qwen3Config

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
    def __init__(self, measure=rss):
        self.measure = measure

    def __enter__(self):
        self.peak, self._running = self.measure(), True
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while self._running:
            self.peak = max(self.peak, self.measure())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._running = False
        self._thread.join()
        self.peak = max(self.peak, self.measure())


def qwen3_06b_shaped(layers: int) -> Qwen3Config:
    """Qwen3-0.6B's shapes (hidden 1024, intermediate 3072, 16 heads, 8 KV heads, head_dim 128, vocab
    151936, tied embeddings) with `layers` layers."""
    return Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=layers,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, tie_word_embeddings=True)
