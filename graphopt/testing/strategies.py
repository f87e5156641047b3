"""Hypothesis strategies that generate random, valid PyTorch models for testing passes.

A model is drawn as a *spec*: layers over a stack of values whose shapes are tracked while
drawing, so every model is valid by construction (nothing is generated and then thrown away for
a shape error). The spec is rendered to Python source (an ``nn.Module`` class plus the lines that
build it with seeded weights and example inputs) and the case's module is built by executing
that very source, so the code a failure prints *is* the model, not a description of it::

    from hypothesis import given
    from graphopt.testing import models

    @given(models(ops=["conv2d", "batch_norm", "relu"], dtypes=(torch.float32, torch.float64)))
    def test_my_pass(case):
        graphopt.testing.assert_sound("my-pass", case)

Shrinking: each step (one layer, or a small block) is one hypothesis draw that starts with a
"go on?" choice, so the shrinker can drop whole steps, and every list of choices starts with its
simplest option (a plain op, the most recent value, no reuse, no in-place): a failure shrinks
toward a few plain ops. Weights come from a generator seeded by a drawn integer, which shrinks
to 0 like any other choice.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
from hypothesis import assume
from hypothesis import strategies as st

from graphopt import verify
from graphopt.errors import PropertyTestError
from graphopt.ir.shapes import resize as _resize
from graphopt.testing.builder import _below, _Builder, _Config, _Value
from graphopt.testing.cases import Case, LayerSpec, ModelSpec, _input_names, case_from_code, randomize_, render
from graphopt.testing.kinds import (
    _BLOCK, _KINDS, _REUSE, _SHAPE_READS, _SQUEEZE_EXCITE, _WEIGHTED_FAMILIES, FEATURES, OP_KINDS, _allowed,
)

__all__ = ["Case", "ModelSpec", "LayerSpec", "FEATURES", "OP_KINDS", "OTHER_BATCH_SIZES", "models", "model_specs",
           "render", "case_from_code", "inputs_at_batch", "randomize_"]


# --------------------------------------------------------------------------- strategies


def _input_ranks(kinds: Sequence[str]) -> list[int]:
    """Ranks (4: images, 3: sequences, 2: features) on which some allowed kind can start."""
    probe = _Builder(lambda s: None, _Config(tuple(kinds), 1, 16, (torch.float32,), (4, 4), (1, 1), False, False))
    out = []
    for rank in (4, 3, 2):
        v = _Value("x", (1, 4, 4, 4)[:rank], is_input=True)
        probe.values = [v]
        if any(_KINDS[k].applies(probe, v) for k in kinds):
            out.append(rank)
    return out


#: Whether to add another step: three in four, shrinking toward "stop".
_MORE = st.sampled_from((False, True, True, True))


@st.composite
def _step(draw: Callable[[st.SearchStrategy], Any], b: _Builder, first: bool) -> bool:
    """One step: whether to go on (ignored for the first step), then one layer or block.

    Each step is a single hypothesis draw, so the shrinker can delete a whole step and the
    steps after it still line up; returns False when the model is complete.
    """
    if not draw(_MORE) and not first:
        return False
    outer, b.draw = b.draw, draw
    try:
        # The value to transform: the most recent one by default; earlier ones give branches.
        v = b.values[-1 - draw(_below(min(4, len(b.values))))]
        # models required to read shapes draw those kinds four times as often (fewer rejected)
        boost = 4 if b.cfg.require & {"shape_read", "batch_read"} else 1
        families = [([_KINDS[k] for k in kinds], w * boost if f is _SHAPE_READS else w) for kinds, f, w in
                    ((_allowed(b, f, v), f, w) for f, w in _WEIGHTED_FAMILIES) if kinds]
        families += [([extra], w) for extra, w in ((_BLOCK, 3), (_SQUEEZE_EXCITE, 1), (_REUSE, 1))
                     if extra.applies(b, v)]
        if families:
            b.pick(b.weighted(families)).build(b, v)
    finally:
        b.draw = outer
    return True


@st.composite
def _specs(draw: Callable[[st.SearchStrategy], Any], cfg: _Config) -> ModelSpec:
    b = _Builder(draw, cfg)
    dtype = draw(st.sampled_from(cfg.dtypes))
    # Mostly images: the models graphopt compiles are mostly convolutional.
    rank = b.weighted([(r, {4: 6, 3: 2, 2: 2}[r]) for r in _input_ranks(cfg.kinds)])
    batch = draw(st.integers(*cfg.batch))
    shape = (batch, draw(st.integers(1, cfg.max_width)),
             *(draw(st.integers(*cfg.spatial)) for _ in range(rank - 2)))
    input_count = draw(st.integers(1, 2))
    seed = draw(st.integers(0, 2**32 - 1))
    b.values = [_Value(name, shape, is_input=True) for name in _input_names(input_count)]
    for index in range(cfg.max_depth):
        if not draw(_step(b, first=index == 0)):
            break
    assume(b.layers)  # e.g. only "split" allowed and a single input channel

    leaves = [v for v in b.values if v.uses == 0 and not v.is_input]
    outputs = leaves if len(leaves) > 1 and draw(st.booleans()) else [b.values[-1]]
    features = set(b.features)
    if len(outputs) > 1:
        features.add("multi_output")
    if any(v not in outputs for v in leaves):
        features.add("dead_value")
    if any(v.uses > 1 for v in b.values):
        features.add("shared_value")
    assume(cfg.require <= features)
    return ModelSpec(
        input_shapes=(shape,) * input_count, dtype=dtype, seed=seed, layers=tuple(b.layers),
        outputs=tuple(v.name for v in outputs), output_shapes=tuple(v.shape for v in outputs),
        features=frozenset(features),
    )


def _check_kinds(ops: Iterable[str] | None) -> tuple[str, ...]:
    if ops is None:
        return OP_KINDS
    kinds = tuple(dict.fromkeys(ops))
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown or not kinds:
        raise PropertyTestError(
            f"models(ops=...): unknown op kind(s) {unknown}; choose from {', '.join(OP_KINDS)}"
            if unknown else "models(ops=...) needs at least one op kind"
        )
    return kinds


def model_specs(
    ops: Iterable[str] | None = None,
    max_depth: int = 6,
    max_width: int = 16,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    spatial: tuple[int, int] = (4, 12),
    batch: tuple[int, int] = (1, 2),
    allow_reuse: bool = True,
    allow_inplace: bool = True,
    require: Iterable[str] = (),
) -> st.SearchStrategy[ModelSpec]:
    """Strategy of :class:`ModelSpec` (the drawn structure, before rendering); see :func:`models`."""
    kinds = _check_kinds(ops)
    required = frozenset(require)
    if not required <= set(FEATURES):
        raise PropertyTestError(f"models(require=...): unknown feature(s) {sorted(required - set(FEATURES))}; "
                                f"choose from {', '.join(FEATURES)}")
    if max_depth < 1 or max_width < 1 or not dtypes or not (1 <= spatial[0] <= spatial[1]) \
            or not (1 <= batch[0] <= batch[1]):
        raise PropertyTestError(
            "models(): need max_depth >= 1, max_width >= 1, at least one dtype, and "
            f"1 <= low <= high for spatial and batch; got max_depth={max_depth}, max_width={max_width}, "
            f"dtypes={tuple(dtypes)}, spatial={spatial}, batch={batch}"
        )
    cfg = _Config(kinds, max_depth, max_width, tuple(dtypes), tuple(spatial), tuple(batch), allow_reuse, allow_inplace,
                  required)
    return _specs(cfg)


#: Batch sizes every drawn model also runs at, besides its example's: models are generic over
#: the batch, which graphopt declares dynamic by default (:mod:`graphopt.ir.shapes`).
OTHER_BATCH_SIZES: tuple[int, ...] = (1, 3, 5)


def inputs_at_batch(example_inputs: Sequence[Any], size: int) -> tuple[Any, ...]:
    """``example_inputs`` at batch ``size``: rows repeated or cut (:func:`graphopt.ir.shapes.resize`)
    in every tensor whose dim 0 is the first tensor's, the inputs ``dynamic_shapes="batch"``
    makes dynamic; other inputs as they are."""
    batched = [x for x in example_inputs if isinstance(x, torch.Tensor) and x.dim() >= 1]
    if not batched:
        return tuple(example_inputs)
    batch = batched[0].shape[0]
    return tuple(_resize(x, {0: size}) if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == batch
                 else x for x in example_inputs)


def _build_case(spec: ModelSpec) -> Case:
    case = case_from_code(render(spec), ops=spec.ops, features=spec.features)
    for size in OTHER_BATCH_SIZES:
        try:
            with torch.no_grad():
                outputs = case.module(*inputs_at_batch(case.example_inputs, size))
        except Exception as exc:
            raise _kit_bug(f"raises {type(exc).__name__} at batch {size}: {exc}", case) from exc
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        got = tuple(tuple(o.shape) for o in outputs)
        want = tuple((size, *s[1:]) for s in spec.output_shapes)
        if got != want:
            raise _kit_bug(f"returns shapes {got} at batch {size}, not {want}", case)
    for inputs in verify.verification_inputs(case.example_inputs, synthesize=len(verify.DISTRIBUTIONS)):
        try:
            with torch.no_grad():
                outputs = case.module(*inputs)
        except Exception as exc:
            raise _kit_bug(f"raises {type(exc).__name__}: {exc}", case) from exc
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        shapes = tuple(tuple(o.shape) for o in outputs)
        if shapes != spec.output_shapes:
            raise _kit_bug(f"returns shapes {shapes}, not the tracked {spec.output_shapes}", case)
        # Weights are scaled to keep values of order one, but products of products can still
        # overflow (float16 first) on the inputs verification synthesizes (up to 100x larger);
        # such models test overflow, not passes.
        assume(all(bool(torch.isfinite(o).all()) for o in outputs))
    return case


def _kit_bug(what: str, case: Case) -> PropertyTestError:
    return PropertyTestError(
        f"graphopt.testing generated a model that {what}: models are valid by construction, so this "
        f"is a bug in the testing kit; please report it with this model:\n{case.code}"
    )


def models(
    ops: Iterable[str] | None = None,
    max_depth: int = 6,
    max_width: int = 16,
    dtypes: Sequence[torch.dtype] = (torch.float32,),
    spatial: tuple[int, int] = (4, 12),
    batch: tuple[int, int] = (1, 2),
    allow_reuse: bool = True,
    allow_inplace: bool = True,
    require: Iterable[str] = (),
) -> st.SearchStrategy[Case]:
    """Strategy of :class:`Case`: random valid models with seeded weights and finite inputs.

    ``ops``: op kinds to draw from (default all of :data:`OP_KINDS`); ``max_depth``: at most
    this many steps, each adding one layer or a small block (conv[-norm][-activation][+residual],
    or a squeeze-excite gate); ``max_width``: at most this many channels/features per value;
    ``dtypes``: model dtypes to draw from (float16 works on CPU for every kind here);
    ``spatial``: range of input heights/widths/lengths; ``batch``: range of the example's batch
    size (1 and 2 by default, so the second size graphopt checks a dynamic batch at is drawn
    both above and below it);
    ``allow_reuse``: a module called at two sites and weights tied between layers;
    ``allow_inplace``: in-place spellings (``torch.relu_``, ``x += y``, ``nn.ReLU(inplace=True)``)
    on values nothing else reads; ``require``: only models with all these :data:`FEATURES`,
    e.g. ``("batch_read",)`` for models that read their batch size (``x.reshape(x.shape[0], -1)``).

    Every model runs at every batch size (checked at 1, 3 and 5): nothing spells the example's
    batch as a number, and about a third of the models read shapes at run time
    (``x.view(x.size(0), x.size(1) * 2, -1)``, a class token ``expand``-ed to ``x.shape[0]``,
    ``x.new_ones(x.shape[0], k)``, ``torch.arange(x.shape[-1])``, splits by computed sizes),
    features ``shape_read`` and ``batch_read``.
    """
    specs = model_specs(ops, max_depth, max_width, dtypes, spatial, batch, allow_reuse, allow_inplace, require)
    return specs.map(_build_case)
