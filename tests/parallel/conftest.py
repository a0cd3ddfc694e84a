"""One spawn of two gloo ranks (FileStore, no torchrun) runs every scenario of workers.py; the tests read
what each rank saved."""

import pytest
import torch
import torch.multiprocessing as mp

from mxfx import checkpoint

from ..models import tiny_qwen3
from . import workers


@pytest.fixture(scope="session")
def whole_checkpoint(tmp_path_factory):
    """workers.WHOLE's mxfp4_dual checkpoint (the model the ranks build with the same seed)."""
    folder = tmp_path_factory.mktemp("tp") / "bf16"
    tiny_qwen3(layers=1, **workers.WHOLE).save_pretrained(folder)
    return checkpoint.quantize(folder, "mxfp4_dual", folder.parent / "dual")


@pytest.fixture(scope="session")
def mxfp8_checkpoint(whole_checkpoint):
    return checkpoint.quantize(whole_checkpoint.parent / "bf16", "mxfp8", whole_checkpoint.parent / "mxfp8")


@pytest.fixture(scope="session")
def ranks(tmp_path_factory, whole_checkpoint, mxfp8_checkpoint):
    """[rank 0's results, rank 1's results]."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(workers.main, args=(2, str(out / "store"), str(out), str(whole_checkpoint), str(mxfp8_checkpoint)),
             nprocs=2)
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r.get("crashed") for r in results] == [None, None], results[0].get("crashed") or results[1]["crashed"]
    return results
