"""A CPU stand-in for `with torch.device("cuda")`: catches draws from a generator on the wrong device.

On a GPU, code built under `with torch.device("cuda"):` creates every tensor whose device is not given
on the GPU. A draw there from a CPU generator (`torch.randn(shape, generator=torch.Generator())`) fails
with "Expected a 'cuda' device type for generator but found 'cpu'". A CPU-only torch has no device that
checks this (`torch.device("meta")` ignores generators), so `PretendAccelerator` is a torch function
mode that computes on the CPU while keeping track of where each tensor would live:

* a factory call (`randn`, `rand`, `empty`, `zeros`, ...) without `device=` lands on the pretended
  device, as under `torch.device(...)`; with `device=` it lands where it says;
* a draw (`generator=`) whose landing device differs from its generator's device raises the error torch
  raises on a GPU, naming both; so does an in-place draw (`uniform_`, `normal_`, ...) on a tensor that
  was created on the pretended device.

It tracks factory results only (not every op's output), which is all this class of bug needs.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

_FACTORIES = _device_constructors()  # what `with torch.device(...)` places on its device
_INPLACE_DRAWS = {
    torch.Tensor.uniform_,
    torch.Tensor.normal_,
    torch.Tensor.random_,
    torch.Tensor.bernoulli_,
    torch.Tensor.exponential_,
    torch.Tensor.geometric_,
    torch.Tensor.log_normal_,
    torch.Tensor.cauchy_,
}
_TAG = "_pretend_device"


class PretendAccelerator(TorchFunctionMode):
    def __init__(self, device: str = "cuda"):
        super().__init__()
        self.device = torch.device(device)
        self.draws = 0  # draws checked (a test can assert the mode saw some)

    def _check(self, func, generator: torch.Generator | None, landing: torch.device) -> None:
        if generator is None:
            return
        self.draws += 1
        if generator.device.type != landing.type:
            raise RuntimeError(
                f"Expected a '{landing.type}' device type for generator but found '{generator.device.type}' "
                f"(in {getattr(func, '__name__', func)} under a {self.device.type} device context)"
            )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _FACTORIES:
            explicit = kwargs.get("device")
            landing = self.device if explicit is None else torch.device(explicit)
            self._check(func, kwargs.get("generator"), landing)
            if explicit is None or landing.type != "cpu":
                kwargs["device"] = "cpu"  # computed on the CPU; remembered as the pretended device
                out = func(*args, **kwargs)
                if isinstance(out, torch.Tensor):
                    setattr(out, _TAG, landing)
                return out
            return func(*args, **kwargs)
        if func in _INPLACE_DRAWS and args and isinstance(args[0], torch.Tensor):
            landing = getattr(args[0], _TAG, args[0].device)
            self._check(func, kwargs.get("generator"), landing)
        return func(*args, **kwargs)
