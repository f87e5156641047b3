"""Running a runnable on inputs: outputs flattened to tensors, arity checked before running."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from graphopt.ir import graph as G
from graphopt.errors import InputError, ModelRunError, exception_summary
from graphopt.ir.lazy import has_code, materialize


def _as_tensor(value: Any, where: str) -> torch.Tensor:
    """A plain (dense, non-quantized, detached) tensor from a tensor, array or number."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.is_quantized:
            return tensor.dequantize()
        return tensor.to_dense() if tensor.layout != torch.strided else tensor
    if isinstance(value, (np.ndarray, np.generic)):
        try:
            return torch.from_numpy(np.array(value))
        except TypeError as exc:
            raise ModelRunError(
                f"{where} is a numpy array of dtype {value.dtype}, which torch cannot hold; "
                "return numeric arrays"
            ) from exc
    if isinstance(value, (bool, int, float, complex)):
        return torch.tensor(value)
    raise ModelRunError(
        f"{where} is a {type(value).__name__}; verification compares tensors, numpy arrays and "
        "numbers (nested in tuples, lists or dicts): return those"
    )


def _flatten_outputs(value: Any, where: str = "output") -> list[torch.Tensor]:
    if value is None:
        return []
    if isinstance(value, Mapping):
        return [t for key, v in value.items() for t in _flatten_outputs(v, f"{where}[{key!r}]")]
    if isinstance(value, (tuple, list)):
        return [t for i, v in enumerate(value) for t in _flatten_outputs(v, f"{where}[{i}]")]
    return [_as_tensor(value, where)]


def _describe(runnable: Any) -> str:
    if isinstance(runnable, fx.GraphModule):
        return "graph module"
    if isinstance(runnable, torch.nn.Module):
        return f"module {type(runnable).__name__}"
    return getattr(runnable, "__qualname__", None) or type(runnable).__name__


def run(runnable: Callable[..., Any], inputs: Any) -> list[torch.Tensor]:
    """Run ``runnable(*inputs)`` under ``torch.no_grad`` and flatten its outputs to tensors.

    The runnable gets copies of the input tensors. Raises :class:`ModelRunError` (the original
    exception chained) when it raises or returns something other than tensors, arrays and numbers.
    """
    args = G.fresh_copies(G.as_input_tuple(inputs))
    try:
        with torch.no_grad():
            result = G.call(runnable, args)
    except Exception as exc:  # any user model/session error becomes one typed error
        raise ModelRunError(
            f"{_describe(runnable)} raised on inputs ({G.describe_values(args)}): {exception_summary(exc)}"
        ) from exc
    return _flatten_outputs(result)


def _positional_arity(runnable: Any) -> tuple[int, int | None] | None:
    """(required, maximum or None for *args) positional parameters, or None when unknown."""
    schema_owner = runnable.forward if isinstance(runnable, torch.jit.ScriptModule) else runnable
    schema = getattr(schema_owner, "schema", None)
    if isinstance(schema, torch._C.FunctionSchema):
        params = [a for a in schema.arguments if a.name != "self"]
        return sum(not a.has_default_value() for a in params), len(params)
    if isinstance(runnable, fx.GraphModule) and not has_code(runnable) \
            and type(runnable.graph._codegen) is not fx.graph.CodeGen:
        materialize(runnable)  # a stale forward shows the signature of plain fx code only
    target = runnable.forward if isinstance(runnable, torch.nn.Module) else runnable
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    positional = [
        p for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    variadic = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
    required = sum(p.default is p.empty for p in positional)
    return required, None if variadic else len(positional)


def _check_arity(runnable: Any, inputs: tuple[Any, ...], role: str) -> None:
    arity = _positional_arity(runnable)
    if arity is None:
        return
    required, maximum = arity
    if required <= len(inputs) and (maximum is None or len(inputs) <= maximum):
        return
    expected = f"{required}" if required == maximum else f"{required} to {maximum if maximum is not None else 'any'}"
    raise InputError(
        f"the {role} ({_describe(runnable)}) takes {expected} input(s) but {len(inputs)} were given "
        f"({G.describe_values(inputs)}); pass example_inputs as a tuple with one entry per forward argument"
    )
