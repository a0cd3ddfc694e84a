"""checkpoint.load(tp_rank, tp_size) in one process (no group needed to load): each rank's stored
tensors are exactly its slice of the whole checkpoint's (along N, or whole K-groups), only those bytes
are read, and a split that would cut a group, or a checkpoint of another layout, is refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mxfx import checkpoint
from mxfx.checkpoint import read as checkpoint_read
from mxfx.parallel import COLUMN, ROW, ParallelError, linear_kinds

from .. import msmodelslim

WRITTEN = ["mxfp8", "mxfp4_w4a8", "mxfp4_dual"]


@pytest.fixture(scope="module")
def folders(whole_checkpoint, tmp_path_factory):
    bf16 = whole_checkpoint.parent / "bf16"
    found = {"mxfp4_dual": whole_checkpoint}
    for scheme in WRITTEN[:2]:
        found[scheme] = checkpoint.quantize(bf16, scheme, tmp_path_factory.mktemp(scheme) / "ckpt")
    for variant, group in (("v0", 0), ("v1", 128)):
        found[f"int4 {variant}"] = msmodelslim.int4_folder(bf16, tmp_path_factory.mktemp("int4") / variant,
                                                           variant, group)[0]
    return found


def _slice(tensor: torch.Tensor, kind: str, rank: int, per: tuple[int, int], full: tuple[int, int]) -> torch.Tensor:
    dim = 0 if kind == COLUMN else 1
    step = full[dim] // 2 // per[dim]
    return tensor.narrow(dim, rank * step, step)


@pytest.mark.parametrize("name", [*WRITTEN, "int4 v0", "int4 v1"])
def test_each_rank_holds_exactly_its_slice_of_the_stored_tensors(folders, name):
    whole = checkpoint.load(folders[name])
    kinds = linear_kinds(whole)
    stored_whole = checkpoint.stored_weights(whole)
    for rank in range(2):
        part = checkpoint.load(folders[name], tp_rank=rank, tp_size=2)
        stored_part = checkpoint.stored_weights(part)
        assert set(stored_part) == set(stored_whole)
        for linear, stored in stored_part.items():
            full = tuple(whole.get_submodule(linear).weight.shape)
            for suffix, tensor in stored.tensors.items():
                theirs = stored_whole[linear].tensors[suffix]
                per = stored.kind.axes(suffix, tuple(theirs.shape), *full)
                if per[1] is None and kinds[linear] == ROW:  # per channel: every rank holds all of it
                    assert torch.equal(tensor, theirs)
                else:
                    assert torch.equal(tensor, _slice(theirs, kinds[linear], rank, per, full)), (linear, suffix)
            assert torch.equal(part.get_submodule(linear).weight,
                               _slice(whole.get_submodule(linear).weight, kinds[linear], rank, (1, 1), full))
        assert torch.equal(part.model.embed_tokens.weight, whole.model.embed_tokens.weight)
        assert part.config.num_key_value_heads == 2 and part.config.intermediate_size == 1024


def test_a_rank_reads_only_its_bytes(folders, monkeypatch):
    reads = []
    original = checkpoint_read._Tensors.read

    def read(self, name, index=()):
        tensor = original(self, name, index)
        reads.append((name, bool(index), tensor.numel() * tensor.element_size()))
        return tensor

    monkeypatch.setattr(checkpoint_read._Tensors, "read", read)
    checkpoint.load(folders["mxfp4_dual"])
    whole = {name: size for name, _, size in reads}
    reads.clear()
    checkpoint.load(folders["mxfp4_dual"], tp_rank=1, tp_size=2)
    sharded = {name: size for name, sliced, size in reads if sliced}
    assert {name for name, sliced, _ in reads if not sliced} == {n for n in whole if "proj" not in n}
    assert sharded and all(2 * size == whole[name] for name, size in sharded.items())
    read_bytes, total = sum(size for *_, size in reads), sum(whole.values())
    assert read_bytes < 0.75 * total  # the replicated embeddings and lm_head are the rest


def test_a_split_that_cuts_a_level0_group_is_refused_naming_the_tensor(folders):
    cut = r"o_proj.weight_dual_scale: this rank's slice \[256, 512\) of K=1024 cuts its groups of 512"
    with pytest.raises(checkpoint.CheckpointError, match=cut):
        checkpoint.load(folders["mxfp4_dual"], tp_rank=1, tp_size=4)
    checkpoint.load(folders["mxfp8"], tp_rank=1, tp_size=4)  # per-32 groups: the same split holds


def test_a_checkpoint_of_another_layout_is_refused(folders, tmp_path):
    """A folder holding rank 0's shard of q_proj (as a per-rank export would) under the whole config."""
    folder = tmp_path / "rank0"
    folder.mkdir()
    for f in folders["mxfp8"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    for suffix in ("weight", "weight_scale"):
        name = f"model.layers.0.self_attn.q_proj.{suffix}"
        tensors[name] = tensors[name][: tensors[name].shape[0] // 2].contiguous()
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match=r"q_proj.weight has shape \[512, 512\].*another"):
        checkpoint.load(folder, tp_rank=0, tp_size=2)


def test_bad_layouts_are_refused(folders):
    with pytest.raises(checkpoint.CheckpointError, match="tp_size 3 does not divide its 8 attention heads"):
        checkpoint.load(folders["mxfp8"], tp_rank=0, tp_size=3)
    with pytest.raises(checkpoint.CheckpointError, match=r"tp_rank must be in \[0, tp_size=2\)"):
        checkpoint.load(folders["mxfp8"], tp_rank=2, tp_size=2)
    assert issubclass(ParallelError, ValueError)
