"""Build any optimizer class from the command line: `--optimizer AdamW --optimizer.lr 4e-4`.

Accepted specs:
  - a class name in `torch.optim` ("AdamW") or a dotted path ("bitsandbytes.optim.PagedAdamW8bit");
  - {"class_path": ..., "init_args": {...}} (as in a YAML recipe);
  - what jsonargparse makes of `--optimizer AdamW --optimizer.lr 4e-4` for the type
    `OptimizerSpec`: a partial of the class with every argument filled in.
Unset arguments take the class's own defaults (torch's AdamW: lr 1e-3, betas (0.9, 0.999),
weight_decay 0.01): recipes state theirs. Unknown names and arguments are one clear error.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Iterable, Union

import torch

from litllm.errors import LitLLMError

# the CLI type of `--optimizer` (jsonargparse resolves class names and `--optimizer.<arg>` flags)
OptimizerSpec = Union[str, Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]]


def optimizer_class(class_path: str) -> type:
    if "." not in class_path:
        cls = getattr(torch.optim, class_path, None)
    else:
        module_name, _, name = class_path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name, None)
        except ImportError:
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise LitLLMError(
            f"--optimizer: {class_path!r} is not an optimizer class (use a torch.optim name such as AdamW, "
            f"or a dotted path such as bitsandbytes.optim.AdamW8bit)"
        )
    return cls


def parse_spec(spec: Any) -> tuple[type, dict[str, Any]]:
    """(optimizer class, keyword arguments) of a spec."""
    if isinstance(spec, str):
        cls, kwargs = optimizer_class(spec), {}
    elif isinstance(spec, dict):
        class_path = spec.get("class_path")
        extra = set(spec) - {"class_path", "init_args"}
        if not class_path or extra:
            raise LitLLMError(f"--optimizer: expected a class name or {{class_path, init_args}}, got {spec!r}")
        cls = optimizer_class(class_path) if isinstance(class_path, str) else class_path
        kwargs = dict(spec.get("init_args") or {})
    elif isinstance(spec, functools.partial) and spec.args and isinstance(spec.args[-1], type):
        cls, kwargs = spec.args[-1], dict(spec.keywords)  # jsonargparse: partial(instantiator, cls, **kwargs)
        if not issubclass(cls, torch.optim.Optimizer):
            raise LitLLMError(f"--optimizer: {cls.__name__} is not an optimizer class")
    elif isinstance(spec, type) and issubclass(spec, torch.optim.Optimizer):
        cls, kwargs = spec, {}
    else:
        raise LitLLMError(f"--optimizer: expected a class name or {{class_path, init_args}}, got {spec!r}")
    if "betas" in kwargs and kwargs["betas"] is not None:
        kwargs["betas"] = tuple(kwargs["betas"])
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise LitLLMError(f"--optimizer: {cls.__name__} has no argument(s) {unknown}")
    return cls, kwargs


def describe(spec: Any) -> dict[str, Any]:
    """The spec as {class_path, init_args} (for hyperparameters.yaml)."""
    cls, kwargs = parse_spec(spec)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": kwargs}


def build_optimizer(spec: Any, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls, kwargs = parse_spec(spec)
    params = list(params)
    accepted = inspect.signature(cls.__init__).parameters
    unset = lambda name: name in accepted and kwargs.get(name) is None  # noqa: E731
    # step all parameters in one kernel: fused on GPUs and CPUs (plain tensors: on the CPU one pass over each
    # tensor, ~4x faster than foreach for `benchmarks/moe.py`'s model), foreach elsewhere
    is_dtensor = any(type(p).__name__ == "DTensor" or type(p.data).__name__ == "DTensor" for p in params)
    fusable = params and params[0].device.type in ("cuda", "cpu") and not is_dtensor
    if unset("fused") and unset("foreach") and fusable:
        kwargs["fused"] = True
    elif unset("foreach") and (kwargs.get("fused") is None):
        kwargs["foreach"] = True
    return cls(params, **kwargs)
