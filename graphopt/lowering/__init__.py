"""Lowering: write a graph to a mobile runtime's file format, reload it there, verify it.

    artifact = graphopt.lower(gm, example_inputs, backend="onnx", path="model.onnx")
    artifact.verdict.ok, artifact.size_bytes, artifact.report["op_counts"], artifact.run(x)

:func:`lower` is the same for every backend: it stages the output file next to ``path``
(:func:`graphopt.fileio.atomic_write`), asks the backend to write it and to load it back in the
backend's own runtime, compares that runtime's outputs with the graph's
(:func:`graphopt.verify.compare`), and only then moves the file into place. A failure at any
step, wrong results included, raises :class:`~graphopt.errors.LoweringError` and leaves ``path``
as it was. The error names every node the backend cannot take, with the user's source line,
found by offering the backend each node alone (:meth:`Backend.probe`).

A backend is a dataclass subclass of :class:`Backend` whose fields are its options, registered
by name::

    @graphopt.register_backend("my-runtime")
    @dataclass
    class MyRuntime(Backend):
        '''One line shown by `graphopt backends`.'''
        suffix = ".bin"
        fast_math: bool = False                       # lower(..., fast_math=True)

        def export(self, gm, example_inputs, path, report): ...   # write the file at ``path``
        def load(self, path, report): ...                         # -> callable(*inputs)

This package never imports a particular backend. The built-ins register themselves when the
package ``graphopt.backends`` is imported; third-party packages declare theirs as Python entry
points in the group ``graphopt.backends``, naming a module that registers its backends or a
Backend class (registered under the entry point's name)::

    [project.entry-points."graphopt.backends"]
    my-runtime = "my_package.backend:MyRuntime"
"""
from __future__ import annotations

from graphopt.errors import exception_summary
from graphopt.lowering.artifact import Artifact
from graphopt.lowering.backend import (
    BACKENDS,
    ENTRY_POINT_GROUP,
    Backend,
    Requires,
    available_backends,
    get_backend,
    register_backend,
    unregister_backend,
)
from graphopt.lowering.probe import OffendingNode, offending_nodes
from graphopt.lowering.run import lower
from graphopt.lowering.support import collect_warnings, other_kernels_tolerance, output_dtype, recording_warnings, tracer_warning

__all__ = [
    "Artifact",
    "Backend",
    "OffendingNode",
    "Requires",
    "available_backends",
    "collect_warnings",
    "other_kernels_tolerance",
    "output_dtype",
    "exception_summary",
    "get_backend",
    "lower",
    "offending_nodes",
    "recording_warnings",
    "register_backend",
    "tracer_warning",
    "unregister_backend",
]
