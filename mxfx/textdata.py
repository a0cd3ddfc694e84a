"""The demo's text: the reference-manual topics every Python ships (pydoc_data.topics), byte-level.

Token ids are UTF-8 byte values 0-255; 256 is <|endoftext|>, put between documents. Every 8th topic in
name order is held out for evaluation; the training script uses the rest.
"""

import torch

END_OF_TEXT = 256
VOCAB_SIZE = 257
HOLD_OUT_EVERY = 8


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def split() -> tuple[list[str], list[str]]:
    """(training topic names, held-out topic names), both in name order."""
    names = sorted(_topics())
    held_out = names[HOLD_OUT_EVERY - 1 :: HOLD_OUT_EVERY]
    return [n for n in names if n not in held_out], held_out


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(ids) -> str:
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def stream(texts: list[str], encode=encode, end: int = END_OF_TEXT) -> torch.Tensor:
    """Documents as one int64 token stream, each followed by the end-of-text token."""
    ids = []
    for text in texts:
        ids += list(encode(text)) + [end]
    return torch.tensor(ids, dtype=torch.long)


def texts(names: list[str]) -> list[str]:
    topics = _topics()
    return [topics[name] for name in names]


def tokens(names: list[str]) -> torch.Tensor:
    """The named topics as one byte-level stream."""
    return stream(texts(names))
