"""Structured inputs and outputs (graphopt.ir.structure): containers the model takes and returns
round-trip through capture, a pipeline, verification and ONNX lowering, and the ONNX file's
inputs and outputs are named by their pytree paths."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.capture import capture_notes

Features = collections.namedtuple("Features", ["features", "score"])


def onnx_names(path) -> tuple[list[str], list[str]]:
    model = onnx.load(str(path))
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def run_by_name(path, feed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the file in ONNX Runtime, feeding and reading every value by its name."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: v.numpy() for k, v in feed.items()})
    return {name: torch.from_numpy(np.asarray(v)) for name, v in zip(names, values)}


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- output names


class NamedTupleOut(nn.Module):
    """Returns a named tuple holding a tensor and a dict holding a tensor and a tuple."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    def forward(self, x):
        f = self.conv(x)
        return Features(f, {"logits": self.fc(f.mean((2, 3))), "pair": (f.sum((1, 2, 3)), f.amax((1, 2, 3)))})


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y, {"pooled": y.mean((2, 3))}


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x)


class ClashingKeys(nn.Module):
    """Output keys that are not valid names or repeat the input's name."""

    def forward(self, x):
        return {"x": x * 2, "a b/c": x + 1, "a_b_c": x - 1}


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_nested_named_tuple_and_dict_outputs_are_named_by_their_paths(mode, tmp_path):
    torch.manual_seed(0)
    model, x = NamedTupleOut().eval(), torch.randn(2, 3, 8, 8)
    gm = graphopt.capture(model, (x,), mode=mode)
    result = graphopt.optimize(gm, (x,), "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed
    out = result.module(x)
    assert type(out) is Features and type(out.score) is dict
    artifact = graphopt.lower(result.module, (x,), backend="onnx", path=tmp_path / "m", reference=model)
    inputs, outputs = onnx_names(artifact.path)
    assert inputs == ["x"] and outputs == ["features", "score.logits", "score.pair.0", "score.pair.1"]
    got, want = run_by_name(artifact.path, {"x": x}), model(x)
    close(got["features"], want.features)
    close(got["score.logits"], want.score["logits"])
    close(got["score.pair.1"], want.score["pair"][1])
    back = artifact.run(x)
    assert type(back) is Features and set(back.score) == {"logits", "pair"}
    close(back.score["pair"][0], want.score["pair"][0])


@pytest.mark.parametrize("model_type,names", [(Plain, ["output_0"]), (TupleOut, ["output_0", "output_1.pooled"])])
def test_plain_tensor_outputs_are_output_i(model_type, names, tmp_path):
    torch.manual_seed(1)
    model, x = model_type().eval(), torch.randn(2, 3, 8, 8)
    artifact = graphopt.lower(model, (x,), backend="onnx", path=tmp_path / "m")
    assert onnx_names(artifact.path) == (["x"], names)
    got, want = run_by_name(artifact.path, {"x": x}), model(x)
    close(got["output_0"], want if isinstance(want, torch.Tensor) else want[0])


def test_output_names_are_made_valid_and_unique_against_the_inputs_too(tmp_path):
    model, x = ClashingKeys().eval(), torch.randn(2, 3)
    artifact = graphopt.lower(model, (x,), backend="onnx", path=tmp_path / "m")
    assert onnx_names(artifact.path) == (["x"], ["x_1", "a_b_c", "a_b_c_1"])
    got = run_by_name(artifact.path, {"x": x})
    close(got["x_1"], x * 2)
    close(got["a_b_c"], x + 1)
    close(got["a_b_c_1"], x - 1)
    assert set(artifact.run(x)) == {"x", "a b/c", "a_b_c"}  # the model's own keys, in the runtime's result


# --------------------------------------------------------------------------- structured inputs


class DictAndListInputs(nn.Module):
    """Takes a dict and a list of tensors, and a flag fixed at capture."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

    def forward(self, inputs, extra):
        y = torch.relu(self.bn(self.conv(inputs["image"]))) * inputs["mask"]
        if inputs["flip"]:
            y = y.flip(-1)
        return {"y": y + extra[0].mean(1).view(-1, 1, 1, 1), "z": extra[1] * 2}


def dict_and_list_example(batch: int = 2):
    return ({"image": torch.randn(batch, 3, 8, 8), "mask": torch.rand(batch, 4, 6, 6), "flip": True},
            [torch.randn(batch, 5), torch.randn(batch, 3)])


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_dict_and_list_inputs_round_trip_through_capture_pipeline_and_onnx(mode, tmp_path):
    torch.manual_seed(2)
    model, example = DictAndListInputs().eval(), dict_and_list_example()
    gm = graphopt.capture(model, example, mode=mode)
    assert [n.name for n in gm.graph.find_nodes(op="placeholder")] == ["inputs_image", "inputs_mask", "extra_0",
                                                                       "extra_1"]
    other = dict_and_list_example(batch=3)
    for out, want in ((gm(*other), model(*other)),  # called with the model's containers, at another batch
                      (gm(inputs=other[0], extra=other[1]), model(*other))):
        assert set(out) == {"y", "z"}
        close(out["y"], want["y"])
    flat = (other[0]["image"], other[0]["mask"], *other[1])
    close(gm(*flat)["z"], model(*other)["z"])  # or with the tensors flat, in path order

    result = graphopt.optimize(gm, example, "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed
    assert result.report.shapes[0] == "inputs_image: batchx3x8x8"
    assert not any(n.target is torch.nn.functional.batch_norm for n in result.module.graph.nodes)
    close(result.module(*other)["y"], model(*other)["y"])

    artifact = graphopt.lower(result.module, example, backend="onnx", path=tmp_path / "m", reference=model)
    assert set(artifact.report["verification"]) == {"example inputs", "inputs at batch=1"}
    assert onnx_names(artifact.path) == (["inputs.image", "inputs.mask", "extra.0", "extra.1"], ["y", "z"])
    got = run_by_name(artifact.path, {"inputs.image": other[0]["image"], "inputs.mask": other[0]["mask"],
                                      "extra.0": other[1][0], "extra.1": other[1][1]})
    close(got["y"], model(*other)["y"])
    back = artifact.run(*other)
    assert type(back) is dict
    close(back["z"], model(*other)["z"])


def test_calibration_batches_come_as_the_model_is_called():
    """Keyword inputs, or the model's own containers, per calibration batch: read as the graph's
    flat inputs by quantize, and a batch of another structure is refused by number."""
    torch.manual_seed(4)

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1)

        def forward(self, image, mask=None, scale=None):
            return self.head(torch.relu(self.conv(image)) * mask)

    def batch(n=2):
        return {"image": torch.randn(n, 3, 8, 8), "mask": torch.rand(n, 4, 6, 6)}

    model = Keywords().eval()
    result = graphopt.optimize(model, batch(), "mobile-int8", calibration_data=[batch() for _ in range(4)])
    assert any(r.name == "quantize" and r.status == "changed" for r in result.report.records)
    assert not any(r.name == "quantize" and "synthesized" in " ".join(r.notes) for r in result.report.records)

    model, example = DictAndListInputs().eval(), dict_and_list_example()
    gm = graphopt.capture(model, example)
    good = graphopt.optimize(gm, example, "mobile-int8", calibration_data=[dict_and_list_example() for _ in range(3)])
    assert any(r.name == "quantize" and r.status == "changed" for r in good.report.records)
    short = [dict_and_list_example(), ({"image": example[0]["image"], "mask": example[0]["mask"], "flip": True},
                                       [example[1][0]])]
    with pytest.raises(graphopt.CalibrationDataError, match="calibration batch #1: inputs are structured as"):
        graphopt.optimize(gm, example, "mobile-int8", calibration_data=short, on_failure="raise")


def test_structured_inputs_are_refused_when_their_structure_or_a_fixed_value_differs():
    torch.manual_seed(3)
    model, example = DictAndListInputs().eval(), dict_and_list_example()
    gm = graphopt.capture(model, example)
    image, mask = example[0]["image"], example[0]["mask"]
    with pytest.raises(graphopt.InputError, match="structured as"):
        gm({"image": image, "mask": mask, "flip": True}, [example[1][0]])  # one list item short
    with pytest.raises(graphopt.InputError, match=r"inputs.flip is False, but the graph was captured with True"):
        gm({"image": image, "mask": mask, "flip": False}, example[1])
    with pytest.raises(graphopt.InputError, match="takes inputs, extra"):
        gm(example[0], extras=example[1])


@dataclasses.dataclass
class ImageBatch:
    pixels: torch.Tensor
    scale: torch.Tensor


class DataclassInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, batch: ImageBatch):
        return self.conv(batch.pixels) * batch.scale


class TupleInput(nn.Module):
    def forward(self, pair):
        a, b = pair
        return a @ b.transpose(-1, -2)


def test_dataclass_inputs_are_registered_with_a_note_and_round_trip(tmp_path):
    torch.manual_seed(4)
    model = DataclassInput().eval()
    example = (ImageBatch(torch.randn(2, 3, 8, 8), torch.rand(2, 1, 1, 1)),)
    result = graphopt.optimize(model, example, "mobile-fp32")
    assert any(note.startswith("registered dataclass ImageBatch") for note in result.report.notes)
    assert result.report.final_verdict.ok
    other = ImageBatch(torch.randn(3, 3, 8, 8), torch.rand(3, 1, 1, 1))
    close(result.module(other), model(other))
    artifact = graphopt.lower(result.module, example, backend="onnx", path=tmp_path / "m", reference=model)
    assert onnx_names(artifact.path) == (["batch.pixels", "batch.scale"], ["output_0"])
    close(artifact.run(other), model(other))
    assert capture_notes(graphopt.capture(model, example)) == []  # registered once: no note the second time


def test_tuple_input_items_are_named_by_index(tmp_path):
    torch.manual_seed(5)
    model, example = TupleInput().eval(), ((torch.randn(2, 4, 3), torch.randn(2, 5, 3)),)
    artifact = graphopt.lower(model, example, backend="onnx", path=tmp_path / "m", reference=model)
    assert onnx_names(artifact.path) == (["pair.0", "pair.1"], ["output_0"])
    got = run_by_name(artifact.path, {"pair.0": example[0][0], "pair.1": example[0][1]})
    close(got["output_0"], model(*example))


@pytest.mark.parametrize("backend", ["torchscript-mobile", "executorch"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_nested_named_tuple_outputs_lower_flat_and_come_back_in_their_containers(mode, backend, tmp_path):
    if backend == "executorch":
        pytest.importorskip("executorch", reason="executorch is not installed")
    torch.manual_seed(6)
    model, x = NamedTupleOut().eval(), torch.randn(2, 3, 8, 8)
    gm = graphopt.capture(model, (x,), mode=mode)
    artifact = graphopt.lower(gm, (x,), backend=backend, path=tmp_path / "m", reference=model)
    assert set(artifact.report["verification"]) == {"example inputs", "inputs at batch=1"}
    assert artifact.report["output_names"] == ["features", "score.logits", "score.pair.0", "score.pair.1"]
    if backend == "torchscript-mobile":  # the named tuple built in forward is read field by field: scriptable
        assert artifact.report["converter"] == "script"
    other = torch.randn(3, 3, 8, 8)
    back, want = artifact.run(other), model(other)
    assert type(back) is Features and type(back.score) is dict and type(back.score["pair"]) is tuple
    close(back.features, want.features)
    close(back.score["logits"], want.score["logits"])
    close(back.score["pair"][1], want.score["pair"][1])
    assert type(gm(x)) is Features  # the graph given to lower still returns the model's containers
