"""mxfx::inference_only: mxfx's own extension (no torch_npu counterpart), emitted by the rewrite only
when the traced graph would carry gradients through a quantized linear (grad mode on, and the
activation or weight requiring grad). Forward: a copy of the quantized output, tied to the activation
and the weight so that it requires grad like the linear it replaced; backward: a clear error, where
autograd would otherwise hand out None gradients (the quantized ops have no backward: mxfx is for
inference)."""

import torch

torch.library.define("mxfx::inference_only", "(Tensor y, Tensor x, Tensor weight, str linear) -> Tensor")


@torch.library.impl("mxfx::inference_only", "CompositeExplicitAutograd")
def _inference_only(y, x, weight, linear):
    return y.clone()


@torch.library.register_fake("mxfx::inference_only")
def _inference_only_fake(y, x, weight, linear):
    return torch.empty_like(y)


def _setup(ctx, inputs, output):
    ctx.linear = inputs[3]


def _backward(ctx, grad):
    raise RuntimeError(f"mxfx: a gradient reached the quantized linear {ctx.linear}; its MX ops have no backward "
                       "(mxfx is for inference): run the compiled model under torch.no_grad() or "
                       "torch.inference_mode(), or train the unquantized model")


torch.library.register_autograd("mxfx::inference_only", _backward, setup_context=_setup)
