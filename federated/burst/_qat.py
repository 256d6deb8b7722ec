"""Quantisation-aware training: int8 fake-quant on weights and activations, straight-through gradients.

:class:`QATModel` wraps a task model without changing its layout: every ``Linear``/``Conv`` weight gets a
per-tensor symmetric int8 fake-quant (``[-127, 127]``, scale ``max|w| / 127``, what TFLite's int8 kernels use
for weights) as a ``torch.nn.utils.parametrize`` parametrisation, and the input of every such layer plus the
model's output get a per-tensor affine int8 fake-quant (``[-128, 127]`` over an exponential moving average of
the observed min/max, always containing 0: TFLite's activation scheme). Gradients pass straight through the
rounding and are zero where an activation was clipped.

:func:`export_float_state_dict` gives the task model's state dict with the *fake-quantised* weights: they lie on
the int8 grid, so the build's quantiser (same per-tensor symmetric range) reproduces them exactly, and the fp32
variant computes with the weights the network was fine-tuned with.
"""

from __future__ import annotations

from typing import Any, Final

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ActivationFakeQuant", "QATModel", "WeightFakeQuant", "export_float_state_dict"]

_QUANTISED_LAYERS: Final = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_EPS: Final = 1e-8


class WeightFakeQuant(nn.Module):
    """Per-tensor symmetric int8: ``round(w / s).clamp(-127, 127) * s`` with ``s = max|w| / 127``; STE."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        scale = weight.detach().abs().max().clamp(min=_EPS) / 127.0
        quantised = torch.clamp(torch.round(weight / scale), -127.0, 127.0) * scale
        return weight + (quantised - weight).detach()


class ActivationFakeQuant(nn.Module):
    """Per-tensor affine int8 over an EMA of min/max (updated in training mode); identity until first seen."""

    lo: torch.Tensor
    hi: torch.Tensor
    seen: torch.Tensor

    def __init__(self, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.zeros(()))
        self.register_buffer("seen", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if self.training:
            with torch.no_grad():
                lo = torch.clamp(xf.min(), max=0.0)
                hi = torch.clamp(xf.max(), min=0.0)
                if bool(self.seen):
                    self.lo.lerp_(lo, self.momentum)
                    self.hi.lerp_(hi, self.momentum)
                else:
                    self.lo.copy_(lo)
                    self.hi.copy_(hi)
                    self.seen.fill_(True)
        if not bool(self.seen):
            return x
        scale = (self.hi - self.lo).clamp(min=_EPS) / 255.0
        zero_point = torch.round(-self.lo / scale) - 128.0
        clipped = torch.clamp(xf, self.lo, self.hi)  # gradient 0 outside the range
        quantised = (torch.clamp(torch.round(clipped / scale) + zero_point, -128.0, 127.0) - zero_point) * scale
        return (clipped + (quantised - clipped).detach()).to(x.dtype)


def _input_hook(fake_quant: ActivationFakeQuant) -> Any:
    def hook(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (fake_quant(args[0]), *args[1:])

    return hook


class QATModel(nn.Module):
    """``model`` (changed in place: parametrised weights, input hooks) with fake-quant; output fake-quantised."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.act = nn.ModuleDict()
        self.layers: list[str] = []
        for name, module in list(model.named_modules()):
            if isinstance(module, _QUANTISED_LAYERS):
                fake_quant = ActivationFakeQuant()
                self.act[f"in_{len(self.layers)}"] = fake_quant
                module.register_forward_pre_hook(_input_hook(fake_quant))
                parametrize.register_parametrization(module, "weight", WeightFakeQuant())
                self.layers.append(name)
        if not self.layers:
            raise ValueError("the model has no Linear/Conv layer to quantise")
        self.act["output"] = ActivationFakeQuant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.act["output"](self.model(x))
        return out


def export_float_state_dict(qat: QATModel, template: nn.Module) -> dict[str, torch.Tensor]:
    """``template``'s state dict layout (the plain task model) filled from ``qat``: weights fake-quantised, on CPU."""
    source = qat.model.state_dict()
    exported: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key in template.state_dict():
            module_name, _, attr = key.rpartition(".")
            module = qat.model.get_submodule(module_name) if module_name else qat.model
            if parametrize.is_parametrized(module, attr):
                value = getattr(module, attr)
            else:
                value = source[key]
            exported[key] = value.detach().to("cpu", copy=True)
    return exported
