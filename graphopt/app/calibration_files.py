"""Calibration data from a file, for the command line (``--calibration-data FILE``).

- ``.pt``: a list of input tuples (or of tensors, for a one-input model), saved with
  ``torch.save``; loaded with ``torch.load(weights_only=True)``, which runs no code from the file.
- ``.npy``: one array for a one-input model; its first axis runs over the batches, each shaped
  like the example input (``N x 1 x 3 x 224 x 224`` for an example of ``1 x 3 x 224 x 224``).
- ``.npz``: one array per input (``numpy.savez(f, x0, x1)`` names them ``arr_0``, ``arr_1``, which
  are taken in that order; other names are taken in the file's order), each with the same
  first axis over the batches.

The batches are checked as ``optimize(calibration_data=...)`` checks them (arity, dtype, shape,
finite values); a file that cannot be read or does not fit raises CalibrationDataError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from graphopt.errors import CalibrationDataError
from graphopt.quantization.calibration import check_batches


def _from_arrays(arrays: list[Any], path: Path) -> list[tuple[torch.Tensor, ...]]:
    counts = {int(a.shape[0]) if a.ndim else -1 for a in arrays}
    if len(counts) != 1 or -1 in counts:
        raise CalibrationDataError(
            f"{path}: the arrays' first axes hold {sorted(counts)} batches; every array needs a first axis "
            "over the batches, of the same length")
    try:
        tensors = [torch.from_numpy(a.copy()) for a in arrays]
    except TypeError as exc:
        raise CalibrationDataError(f"{path}: an array of a type torch cannot hold: {exc}") from exc
    return [tuple(t[i] for t in tensors) for i in range(counts.pop())]


def load_calibration_file(path: str | Path, example_inputs: tuple[Any, ...],
                          dynamic: Sequence[frozenset[int]] | None = None) -> list[tuple[Any, ...]]:
    """The batches in ``path`` as input tuples, checked against ``example_inputs``
    (``dynamic``: the dims of each input that may differ; default dim 0)."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"--calibration-data {path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".pt":
            data = torch.load(path, weights_only=True)
            if isinstance(data, torch.Tensor) or not isinstance(data, (list, tuple)):
                raise CalibrationDataError(
                    f"{path}: holds a {type(data).__name__}; save a list of input tuples, "
                    "e.g. torch.save([(x,) for x in batches], path)")
            batches = [tuple(item) if isinstance(item, (list, tuple)) else (item,) for item in data]
        elif suffix == ".npy":
            batches = _from_arrays([np.load(path, allow_pickle=False)], path)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                names = sorted(archive.files, key=lambda n: (0, int(n[4:])) if n.startswith("arr_") and n[4:].isdigit()
                               else (1, archive.files.index(n)))
                batches = _from_arrays([archive[n] for n in names], path)
        else:
            raise CalibrationDataError(f"{path}: unknown suffix {path.suffix!r}; give a .pt (list of input tuples), "
                                       ".npy (one input) or .npz (one array per input) file")
    except CalibrationDataError:
        raise
    except Exception as exc:  # a corrupt or foreign file: numpy and torch raise many kinds
        raise CalibrationDataError(f"{path}: cannot read it as {suffix} calibration data: "
                                   f"{type(exc).__name__}: {exc}") from exc
    if not batches:
        raise CalibrationDataError(f"{path}: holds no batches; give at least one input tuple")
    try:
        check_batches(example_inputs, batches, dynamic=dynamic)
    except CalibrationDataError as exc:
        raise CalibrationDataError(f"{path}: {exc}") from exc
    return batches
