"""The demo's text: the reference-manual topics every Python ships (pydoc_data.topics), byte-level.

Token ids are UTF-8 byte values 0-255; 256 is <|endoftext|>, put between documents. Nine topics, fixed
by name (every 8th in name order in Python 3.11's manual), are held out for evaluation; the training
script uses the rest. Naming them keeps the split when another Python's manual adds or drops topics.
"""

import torch

END_OF_TEXT = 256
VOCAB_SIZE = 257
HELD_OUT = ("augassign", "booleans", "continue", "exceptions", "id-classes", "lists", "power", "string-methods",
            "typesmethods")


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def split() -> tuple[list[str], list[str]]:
    """(training topic names, held-out topic names) among this Python's topics, both in name order."""
    names = sorted(_topics())
    return [n for n in names if n not in HELD_OUT], [n for n in names if n in HELD_OUT]


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
