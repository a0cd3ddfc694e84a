"""What each of the two gloo ranks runs (spawned by conftest.py, one spawn for the whole directory, since
starting a process and importing transformers is the slow part). Every scenario's results, or the
error it raised, go to `out/rank{r}.pt` for the tests to compare across ranks and against TP=1."""

import datetime
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

import mxfx
from mxfx import checkpoint
from mxfx.parallel import ParallelError, ParallelSchemes, tensor_parallel
from mxfx.schemes import MODELSLIM, MXFP4, SCHEMES
from mxfx.selection import ALL
from mxfx.targets import get_target

from ..models import tiny_qwen3

WHOLE = {"head_dim": 128, "intermediate_size": 2048}  # K/2 of o_proj (512) and down_proj (1024) keep 512-blocks
COLUMN_PROBES = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj")  # inputs equal at TP=1
ROW_PROBES = ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj")
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _capture(model, names, store: dict, tag: str) -> None:
    for name in names:
        def hook(module, args, output, key=f"{name}/{tag}"):
            store[key] = output
        model.get_submodule(name).register_forward_hook(hook)


def _logits(model, scheme) -> tuple[torch.Tensor, list]:
    torch._dynamo.reset()
    backend = mxfx.backend(scheme, target="reference", progress=False)
    with torch.no_grad():
        logits = torch.compile(model, backend=backend, fullgraph=True)(IDS).logits
    return logits, [(r.fqn, r.outcome, r.scheme) for report in backend.reports for r in report.linears]


def _eager(model, selector) -> torch.Tensor:
    """The TP=1 reference without compiling: each linear the backend would quantize runs its scheme's
    `linear` eagerly (what the rewritten graph computes)."""
    target, patched = get_target("reference"), []
    for name, module in model.named_modules():
        scheme = selector.scheme_for(module.weight) if isinstance(module, torch.nn.Linear) else None
        if scheme is not None and ALL.skip(name) is None and scheme.skip(module.in_features) is None:
            prepared = scheme.prepare(target, module.weight, module.bias, torch.bfloat16)
            module.forward = lambda x, s=scheme, p=prepared: s.linear(target, x, p)
            patched.append(module)
    with torch.no_grad():
        logits = model(IDS).logits
    for module in patched:
        del module.forward
    return logits


def _plan_rows(report) -> list[tuple]:
    return [(p.name, p.kind, p.k, p.n, p.scheme, p.decision) for p in report.linears]


def _error(fn) -> str | None:
    try:
        fn()
    except (ParallelError, ValueError, RuntimeError) as error:
        return f"{type(error).__name__}: {getattr(error, 'inner_exception', None) or error}"
    return None


def schemes(results: dict) -> None:
    """TP=1 then TP=2 on the same model, per scheme; probes capture column outputs and row partials
    (hooks registered before tensor_parallel run before its all-reduce) and the reduced row outputs."""
    for name in SCHEMES:
        model = tiny_qwen3(layers=1, **WHOLE)
        captured: dict = {}
        _capture(model, COLUMN_PROBES + ROW_PROBES, captured, "out")
        with torch.no_grad():
            bf16 = model(IDS).logits
        ref = _eager(model, SCHEMES[name])
        ref_captured = dict(captured)
        report = tensor_parallel(model, scheme=name)
        _capture(model, ROW_PROBES, captured, "reduced")
        logits, linears = _logits(model, report.scheme)
        results[name] = {"bf16": bf16, "ref": ref, "ref_captured": ref_captured, "logits": logits,
                         "captured": dict(captured), "plan": _plan_rows(report), "linears": linears}


def fallback(results: dict) -> None:
    """tiny_qwen3's o_proj (K 512) and down_proj (K 1536) at TP=2 break dual-level's 512 rule: they run
    mxfp4; the TP=1 reference runs the same schemes per linear."""
    model = tiny_qwen3(layers=1)
    moved = {model.get_submodule(n).weight: MXFP4() for n in ROW_PROBES}
    ref = _eager(model, ParallelSchemes(SCHEMES["mxfp4_dual"], moved))
    report = tensor_parallel(model, scheme="mxfp4_dual")
    logits, linears = _logits(model, report.scheme)
    results["fallback"] = {"ref": ref, "logits": logits, "plan": _plan_rows(report), "linears": linears,
                           "table": str(report), "label": report.scheme.label}


def loaded(results: dict, folder: Path) -> None:
    """The mxfp4_dual checkpoint of the WHOLE model loaded per rank, against it loaded whole (eager)."""
    ref = _eager(checkpoint.load(folder), MODELSLIM)
    model = checkpoint.load(folder, tp_rank=dist.get_rank(), tp_size=2)
    unconnected = _error(lambda: model(IDS))
    report = tensor_parallel(model)
    logits, linears = _logits(model, report.scheme)
    whole = checkpoint.load(folder)  # loaded whole, then sharded in memory: the same codes and logits
    sharded = tensor_parallel(whole)
    same_codes = all(torch.equal(t, checkpoint.stored_weights(whole)[name].tensors[suffix])
                     for name, stored in checkpoint.stored_weights(model).items()
                     for suffix, t in stored.tensors.items())
    results["loaded"] = {"ref": ref, "logits": logits, "unconnected": unconnected, "plan": _plan_rows(report),
                         "same_codes": same_codes, "eager": _eager(model, report.scheme),
                         "sharded_eager": _eager(whole, sharded.scheme)}


def bad_input(results: dict, folder: Path, mxfp8: Path) -> None:
    """Each raises on both ranks (a rank raising alone would hang the other)."""
    rank = dist.get_rank()
    results["kv_heads"] = _error(lambda: tensor_parallel(tiny_qwen3(1, num_attention_heads=6,
                                                                    num_key_value_heads=3)))
    results["same_slice"] = _error(lambda: tensor_parallel(checkpoint.load(folder, tp_rank=0, tp_size=2)))
    results["other_tp"] = _error(lambda: tensor_parallel(checkpoint.load(mxfp8, tp_rank=rank, tp_size=4)))
    model = tiny_qwen3(layers=1, **WHOLE)
    tensor_parallel(model)
    results["twice"] = _error(lambda: tensor_parallel(model))


def dtensors(results: dict) -> None:
    """A model parallelized with torch.distributed.tensor.parallel: refused by tensor_parallel and by the
    backend, saying what to do."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = tiny_qwen3(layers=1, **WHOLE)
    split = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
             "self_attn.v_proj": ColwiseParallel(), "self_attn.o_proj": RowwiseParallel(),
             "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()}
    parallelize_module(model, init_device_mesh("cpu", (2,)), {f"model.layers.0.{k}": v for k, v in split.items()})
    results["dtensor_tp"] = _error(lambda: tensor_parallel(model))
    results["dtensor_compile"] = _error(lambda: _logits(model, "mxfp8"))


def main(rank: int, world: int, store: str, out: str, folder: str, mxfp8: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results: dict = {}
    scenarios = (schemes, fallback, lambda r: loaded(r, Path(folder)),
                 lambda r: bad_input(r, Path(folder), Path(mxfp8)), dtensors)
    for scenario in scenarios:
        try:
            scenario(results)
        except Exception:  # noqa: BLE001 -- recorded for the tests; the ranks stay in step (each scenario is collective)
            results.setdefault("crashed", []).append(traceback.format_exc())
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()
