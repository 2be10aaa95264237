"""Features of LoRA on a parameter (``target_parameters``): read where the module computes with the parameter.

PEFT's ``ParamWrapper`` adds ``ΔW = s·B A`` (``B``: ``out × r`` on ``W``'s first axis, ``A``: ``r × in`` on its second)
to a 2-d parameter ``W`` for the module's forward, and the module uses ``W`` as it likes. Every linear use contracts
an input ``x`` with one of ``W``'s axes, and that decides the condition:

* ``F.linear(x, W)``, ``x @ Wᵀ``, ``W @ xᵀ`` (the second axis): ``A`` against ``x``, ``B`` against ``A x``;
* ``x @ W``, ``Wᵀ @ xᵀ`` (the first axis): ``Bᵀ`` against ``x``, ``Aᵀ`` against ``x B``.

Each factor has a group for each orientation (left and right projections commute, so both together are the exact
projection onto what both conditions allow); the orientation a module never uses gets no features and no basis.
While the memory is collected, a ``TorchFunctionMode`` follows the parameter through PEFT's parametrization
(``W + ΔW``) and its transposes to the products that read it; any other use raises, naming it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .groups import FeatureSource

TensorBase = torch._C.TensorBase
ADDS = {TensorBase.add, TensorBase.__add__, TensorBase.__radd__, torch.add}
MATMULS = {TensorBase.matmul, TensorBase.__matmul__, TensorBase.mm, torch.matmul, torch.mm}
LINEARS = {F.linear, torch._C._nn.linear}
TRANSPOSES = {TensorBase.t, torch.t}
TRANSPOSED_VIEWS = {TensorBase.__dict__["T"], TensorBase.__dict__["mT"]}
PASSING = {TensorBase.__dict__["shape"], TensorBase.__dict__["dtype"], TensorBase.__dict__["device"], TensorBase.dim,
           TensorBase.size}  # fmt: skip


class UnknownUse(ValueError):
    pass


class _Watch(TorchFunctionMode):
    """Follows ``param`` (as ``W + ΔW``) and its transposes; records ``(orientation, rows)`` of each product."""

    def __init__(self, param: nn.Parameter, name: str) -> None:
        super().__init__()
        self.param, self.name = param, name
        self.tracked: dict[int, tuple[torch.Tensor, bool]] = {}  # id -> (tensor, transposed)
        self.found: list[tuple[str, torch.Tensor]] = []

    def _tracked(self, value) -> bool | None:
        """Whether ``value`` is the parameter seen transposed (``None``: it is not the parameter)."""
        entry = self.tracked.get(id(value)) if isinstance(value, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is value else None

    def _reads(self, args, kwargs) -> bool:
        """The parameter anywhere in the call (arguments, keywords, or inside a list or tuple of them)."""
        values = [*args, *kwargs.values()]
        values += [item for value in values if isinstance(value, (list, tuple)) for item in value]
        return any(self._tracked(value) is not None for value in values)

    def _record(self, func, args, kwargs) -> None:
        """``second``: the input contracts W's second axis (A reads it); ``first``: its first axis (Bᵀ reads it)."""
        if func in LINEARS:
            inputs = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            transposed = self._tracked(weight)
            if transposed is not None and self._tracked(inputs) is None:
                self.found.append(("first" if transposed else "second", inputs))
                return
        elif func in MATMULS and len(args) == 2 and not kwargs and args[0].dim() >= 1 and args[1].dim() == 2:
            left, right = self._tracked(args[0]), self._tracked(args[1])
            if right is not None and left is None:  # x @ W contracts W's first axis
                self.found.append(("second" if right else "first", args[0]))
                return
            if left is not None and right is None and args[0].dim() == 2:  # W @ y: W's second axis with y's rows
                self.found.append(("first" if left else "second", args[1].T))
                return
        raise UnknownUse(
            f"peft_gp cannot see how the LoRA-adapted parameter {self.name!r} is used: it reached "
            f"{getattr(func, '__name__', func)!r}, and only F.linear and matrix products with it are understood. "
            "Target the module instead (target_modules), or leave this parameter out of target_parameters."
        )

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in ADDS and any(value is self.param for value in args):  # PEFT's W + ΔW
            self.tracked[id(out)] = (out, False)
            return out
        descriptor = getattr(func, "__self__", None)
        if not self._reads(args, kwargs) or func in PASSING or descriptor in PASSING:
            return out
        transposed = self._tracked(args[0]) if args else None
        if (func in TRANSPOSES or descriptor in TRANSPOSED_VIEWS) and transposed is not None:
            self.tracked[id(out)] = (out, not transposed)
        else:
            self._record(func, args, kwargs)
        return out


class ParameterWatch:
    """One per ``ParamWrapper``: while a memory is collected, the products that read its parameter, handed to the
    four groups of its factors (``A``/``B`` for the second axis, ``At``/``Bt`` for the first)."""

    def __init__(self, wrapper: nn.Module, lora_a: nn.Linear, lora_b: nn.Linear, name: str) -> None:
        self.wrapper, self.lora_a, self.lora_b, self.name = wrapper, lora_a, lora_b, name
        self.emitters: dict[str, object] = {}
        self.handles: list = []
        self.watch: _Watch | None = None

    def rows(self, part: str, orientation: str, inputs: torch.Tensor) -> torch.Tensor | None:
        if (orientation == "second") != (part in ("A", "B")):
            return None
        if part == "B":
            return F.linear(inputs.to(self.lora_a.weight.dtype), self.lora_a.weight)
        if part == "At":
            return inputs.to(self.lora_b.weight.dtype) @ self.lora_b.weight
        return inputs

    def _enter(self, module, args) -> None:
        self.watch = _Watch(self.wrapper.get_param(), self.name)
        self.watch.__enter__()

    def _exit(self, module, args, output) -> None:
        watch, self.watch = self.watch, None
        if watch is None:
            return
        watch.__exit__(None, None, None)
        with torch.no_grad():
            for orientation, inputs in watch.found:
                for part, emit in self.emitters.items():
                    rows = self.rows(part, orientation, inputs)
                    if rows is not None:
                        emit(rows.detach(), True)

    def attach(self, part: str, emit) -> _Detach:
        self.emitters[part] = emit
        if not self.handles:
            self.handles = [
                self.wrapper.register_forward_pre_hook(self._enter),
                self.wrapper.register_forward_hook(self._exit, always_call=True),
            ]
        return _Detach(self, part)


class _Detach:
    def __init__(self, watch: ParameterWatch, part: str) -> None:
        self.watch, self.part = watch, part

    def remove(self) -> None:
        self.watch.emitters.pop(self.part, None)
        if not self.watch.emitters:
            for handle in self.watch.handles:
                handle.remove()
            self.watch.handles = []


class ParameterUses(FeatureSource):
    def __init__(self, watch: ParameterWatch, part: str) -> None:
        self.watch, self.part = watch, part

    def attach(self, emit):
        return self.watch.attach(self.part, emit)
