"""Capture runs a copy of the model (the reference run, shape recording) and must leave no
trace: the user's tensors are only ever read, and every run of the copy starts from the
model's state, however the model writes its state (in place, through ``.data``, in training
mode), so the graph reproduces the model and keeps its state."""
from __future__ import annotations

import torch
import torch.nn as nn

from graphopt.capture import capture


class _CountsThroughData(nn.Module):
    """Keeps a call counter the old way, through ``.data``, which no version counter sees."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))
        self.scale = nn.Parameter(torch.full((3,), 2.0))

    def forward(self, x):
        self.calls.data.add_(1)
        return x * self.scale * self.calls


class _TrainingState(nn.Module):
    """Training-mode batch norm (running statistics, batch counter) and an in-place parameter write."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.shift = nn.Parameter(torch.zeros(4, 1, 1))

    def forward(self, x):
        with torch.no_grad():
            self.shift.add_(0.5)
        return self.bn(self.conv(x)) + self.shift


def _versions(model: nn.Module) -> dict[str, int]:
    return {k: v._version for k, v in model.state_dict(keep_vars=True).items()}


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class TestTheUsersModel:
    def test_tensors_are_never_written_not_even_with_equal_values(self) -> None:
        for model, x in ((_TrainingState().train(), torch.randn(2, 3, 6, 6)), (_CountsThroughData(), torch.randn(3))):
            versions, values = _versions(model), _values(model)
            capture(model, (x,))
            assert _versions(model) == versions
            assert all(torch.equal(v, values[k]) for k, v in model.state_dict().items())


class TestEveryRunStartsFromTheModelsState:
    def test_a_counter_kept_through_data_is_restored_between_runs_and_in_the_graph(self) -> None:
        model = _CountsThroughData()
        x = torch.randn(3)
        gm = capture(model, (x,))  # would not reproduce if the reference run's count leaked
        assert gm.get_buffer("calls").item() == 0 and model.calls.item() == 0
        torch.testing.assert_close(gm(x), x * 2.0)

    def test_training_state_and_in_place_parameter_writes_are_undone(self) -> None:
        model = _TrainingState().train()
        values = _values(model)
        x = torch.randn(2, 3, 6, 6)
        gm = capture(model, (x,))
        assert all(torch.equal(v, values[k]) for k, v in gm.state_dict().items())
        reference = _TrainingState().train()
        reference.load_state_dict(values)
        with torch.no_grad():  # the graph writes the parameter in place, without the model's no_grad block
            torch.testing.assert_close(gm(x.clone()), reference(x.clone()))
        assert all(torch.equal(a, b) for a, b in zip(gm.state_dict().values(), reference.state_dict().values()))

    def test_tied_parameters_stay_one_tensor_with_its_values(self) -> None:
        first, second = nn.Linear(4, 4), nn.Linear(4, 4)
        second.weight = first.weight
        model = nn.Sequential(first, nn.ReLU(), second).eval()
        gm = capture(model, (torch.randn(2, 4),))
        assert gm.get_parameter("0.weight") is gm.get_parameter("2.weight")
        assert gm.get_parameter("0.weight") is not first.weight
        assert torch.equal(gm.get_parameter("0.weight"), first.weight)
