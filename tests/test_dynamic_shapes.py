"""Dynamic dims: a graph equals its model at every size of its dynamic dims, not only the example's.

Models that read their own shapes (reshape by x.shape[0], view(x.size(0), -1) before a linear, a
ViT class token expanded to the batch, new_ones of the batch size, positions from arange of the
sequence length) go through capture, the presets and every backend, and are compared with the
model at batch 1, 3 and 5. Static shapes, when asked for or when the model cannot vary a dim,
are refused at other sizes with an InputError that names the dim, never answered wrongly.
"""
from __future__ import annotations

import importlib.util
import math
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import graphopt
from graphopt.ir import shapes
from graphopt.errors import InputError
from graphopt.quantization import lowering_tolerance
from graphopt.verify import compare_outputs

BATCHES = (1, 3, 5)


class ReshapeByBatch(nn.Module):
    """The shape-folding case: fold-constants used to bake x.shape[0] into the reshape."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.c(x).reshape(x.shape[0], -1).mean(1)


class ViewBeforeLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3, padding=1, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.c(x))).view(x.size(0), -1))


class ClassToken(nn.Module):
    """ViT style: a learned token expanded to the batch, prepended to the patch sequence."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.tok = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        p = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.tok.expand(x.shape[0], -1, -1), p], dim=1)
        return self.head(self.norm(t)[:, 0])


class NewOnes(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6 + 3, 4)

    def forward(self, x):
        return self.fc(torch.cat([x, x.new_ones(x.shape[0], 3)], dim=1))


class Positions(nn.Module):
    """Reads the sequence length: positions from arange, split by a size computed from shapes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        pos = torch.arange(x.shape[1], device=x.device)
        h = self.fc(x + self.emb(pos))
        a, b = torch.split(h, [h.size(-1) // 2, h.size(-1) - h.size(-1) // 2], dim=-1)
        return a * b.sigmoid()


class FixedBatch(nn.Module):
    """Cannot run at another batch: view(2, -1) is hard-coded."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(x.view(2, -1))


IMAGE = (3, 8, 8)
CASES = {
    "reshape_by_batch": (ReshapeByBatch, IMAGE),
    "view_before_linear": (ViewBeforeLinear, IMAGE),
    "class_token": (ClassToken, IMAGE),
    "new_ones": (NewOnes, (6,)),
}


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    cls, tail = CASES[name]
    model = cls().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    return model, tail


def _close(got: torch.Tensor, want: torch.Tensor, sqnr_db: float | None = None) -> None:
    assert got.shape == want.shape
    if sqnr_db is None:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    else:
        noise = (got - want).double().pow(2).mean().item()
        signal = want.double().pow(2).mean().item()
        assert noise == 0 or 10 * math.log10(signal / noise) >= sqnr_db


# ------------------------------------------------------------------------------ capture


def test_capture_records_the_batch_dim_and_checks_it():
    model, tail = _model("view_before_linear")
    gm = graphopt.capture(model, (torch.randn(2, *tail),))
    assert shapes.describe(gm) == ["x: batchx3x8x8"]
    assert shapes.sizes_for(gm) == {"batch": 1}
    for b in BATCHES:
        x = torch.randn(b, *tail)
        torch.testing.assert_close(gm(x), model(x))


def test_a_dim_the_model_cannot_vary_is_static_with_the_model_error_and_refused():
    gm = graphopt.capture(FixedBatch().eval(), (torch.randn(2, 3, 4),))
    (line,) = shapes.describe(gm)
    assert line.startswith("x: 2x3x4; dim 0 kept static at 2: the model raised RuntimeError at batch=1")
    assert "x.view(2, -1)" in line  # the user's line
    with pytest.raises(InputError, match=r"input 'x' dim 0 is 3, but the graph is specialized to 2"):
        gm(torch.randn(3, 3, 4))


def test_static_shapes_on_request_fold_the_sizes_and_refuse_others():
    model, tail = _model("reshape_by_batch")
    result = graphopt.optimize(model, (torch.randn(2, *tail),), "mobile-fp32", dynamic_shapes="static")
    assert "static shapes: other sizes are refused" in str(result.report)
    reshape = next(n for n in result.module.graph.nodes if n.target in ("reshape", torch.reshape))
    assert reshape.args[1:] == (2, -1) or 2 in reshape.args[1:]  # the batch folded, as asked
    torch.testing.assert_close(result.module(torch.ones(2, *tail)), model(torch.ones(2, *tail)))
    with pytest.raises(InputError, match="dim 0 is 4, but the graph is specialized to 2 at that dim"):
        result.module(torch.randn(4, *tail))


def test_other_dims_than_the_declared_ones_are_refused_by_name():
    model, tail = _model("reshape_by_batch")
    result = graphopt.optimize(model, (torch.randn(2, *tail),), "mobile-fp32")
    with pytest.raises(InputError, match=r"dim 2 is 9, but the graph is specialized to 8 .*dynamic_shapes="):
        result.module(torch.randn(2, 3, 9, 8))


@pytest.mark.parametrize("spec, match", [
    ("dynamic", "use 'batch'"),
    (({0: "batch"}, {0: "batch"}), "2 entries for 1 inputs"),
    ({"y": {0: "b"}}, "'y', which are not inputs"),
    (({5: "b"},), "dim 5 is not a dim"),
    (({0: 3},), "must be named by a string or a torch.export.Dim"),
])
def test_bad_dynamic_shapes_are_input_errors(spec, match):
    model, tail = _model("new_ones")
    with pytest.raises(InputError, match=match):
        graphopt.capture(model, (torch.randn(2, *tail),), dynamic_shapes=spec)


def test_a_named_sequence_dim_and_a_bounded_dim():
    torch.manual_seed(0)
    model = Positions().eval()
    x = torch.randn(2, 6, 8)
    seq = torch.export.Dim("seq", min=2, max=20)
    result = graphopt.optimize(model, (x,), "mobile-fp32", dynamic_shapes={"x": {0: "batch", 1: seq}})
    assert not result.report.failed, result.report
    assert result.report.checked_at == {"batch": 1, "seq": 8}  # seq 1 is below the Dim's min
    for b, s in ((1, 2), (3, 11), (5, 20)):
        y = torch.randn(b, s, 8)
        torch.testing.assert_close(result.module(y), model(y))
    with pytest.raises(InputError, match=r"dim 1 \(seq\) is 21, outside the sizes"):
        result.module(torch.randn(1, 21, 8))


def test_dims_sharing_a_name_must_agree():
    class Two(nn.Module):
        def forward(self, a, b):
            return a * 2 + b

    gm = graphopt.capture(Two(), (torch.randn(2, 3), torch.randn(2, 3)))
    assert shapes.describe(gm) == ["a: batchx3", "b: batchx3"]
    with pytest.raises(InputError, match="same dynamic dim 'batch'"):
        gm(torch.randn(3, 3), torch.randn(4, 3))


def test_export_mode_keeps_the_batch_dynamic_even_from_a_batch_1_example():
    model, tail = _model("reshape_by_batch")
    gm = graphopt.capture(model, (torch.randn(1, *tail),), mode="export")
    assert shapes.describe(gm) == ["x: batchx3x8x8"]
    assert any(n.target == "size" for n in gm.graph.nodes)  # export's size read, in the canonical spelling
    for b in BATCHES:
        x = torch.randn(b, *tail)
        torch.testing.assert_close(gm(x), model(x))


# ------------------------------------------------------------------------------ passes


@pytest.mark.parametrize("example_batch", [1, 2])
@pytest.mark.parametrize("name", sorted(CASES))
def test_mobile_fp32_is_right_at_every_batch(name, example_batch):
    model, tail = _model(name)
    result = graphopt.optimize(model, (torch.randn(example_batch, *tail),), "mobile-fp32")
    assert not result.report.failed, result.report
    assert result.report.checked_at == {"batch": 1 if example_batch > 1 else 2}
    for b in BATCHES:
        x = torch.randn(b, *tail)
        _close(result.module(x), model(x))


@pytest.mark.parametrize("name", sorted(CASES))
def test_mobile_int8_is_right_at_every_batch(name):
    model, tail = _model(name)
    calibration = [(torch.randn(4, *tail),) for _ in range(8)]
    result = graphopt.optimize(model, (torch.randn(2, *tail),), "mobile-int8", calibration_data=calibration)
    assert result.report.final_verdict.ok
    for b in BATCHES:
        x = torch.randn(b, *tail)
        _close(result.module(x), model(x), sqnr_db=10.0)


@pytest.mark.parametrize("name", ["view_before_linear", "class_token"])
def test_pruning_keeps_the_batch_dynamic(name):
    model, tail = _model(name)
    result = graphopt.optimize(model, (torch.randn(2, *tail),), "canonicalize,prune-channels{ratio=0.25,round_to=1},mobile-fp32")
    assert not result.report.failed, result.report
    for b in BATCHES:
        assert result.module(torch.randn(b, *tail)).shape == model(torch.randn(b, *tail)).shape


@graphopt.register_pass("test-bake-batch", contract=graphopt.Lossy(min_sqnr_db=10.0), replace=True)
def _bake_batch(gm: fx.GraphModule, ctx: graphopt.PassContext) -> int:
    """A lossy pass that specializes the batch: replaces every x.size(0)/x.shape[0] read by the
    example's batch. At the example's size it changes nothing."""
    count = 0
    batch = ctx.example_inputs[0].shape[0]
    for node in list(gm.graph.nodes):
        reads_batch = (node.op == "call_method" and node.target == "size" and node.args[1:] == (0,)) or \
            (node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0
             and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_function"
             and node.args[0].target is getattr and node.args[0].args[1] == "shape")
        if reads_batch:
            for user in list(node.users):
                user.args = tuple(batch if a is node else a for a in user.args)
            count += 1
    return count


def test_verification_rolls_back_a_pass_that_specializes_the_batch():
    model, tail = _model("reshape_by_batch")
    result = graphopt.optimize(model, (torch.randn(2, *tail),), ["test-bake-batch"])
    (record,) = result.report.records
    assert record.status == "rolled-back"
    assert "batch=1" in record.error
    x = torch.randn(4, *tail)
    _close(result.module(x), model(x))


# ------------------------------------------------------------------------------ lowering

BACKENDS = ["onnx", "torchscript-mobile"] + (["executorch"] if importlib.util.find_spec("executorch") else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_artifacts_are_right_at_every_batch(name, backend, tmp_path):
    model, tail = _model(name)
    example = (torch.randn(1, *tail),)
    gm = graphopt.optimize(model, example, "mobile-fp32").module
    artifact = graphopt.lower(gm, example, backend=backend, path=tmp_path / name, reference=model)
    assert "static_shapes" not in artifact.report, artifact.report["static_shapes"]
    assert set(artifact.report["verification"]) == {"example inputs", "inputs at batch=2"}
    assert set(artifact.report["against_reference"]) == {"example inputs", "inputs at batch=2"}
    for b in BATCHES:
        x = torch.randn(b, *tail)
        out = artifact.run(x)
        out = out[0] if isinstance(out, (list, tuple)) else out
        _close(torch.as_tensor(out), model(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_int8_artifacts_are_right_at_every_batch(name, backend, tmp_path):
    model, tail = _model(name)
    calibration = [(torch.randn(4, *tail),) for _ in range(8)]
    gm = graphopt.optimize(model, (torch.randn(2, *tail),), "mobile-int8", calibration_data=calibration).module
    artifact = graphopt.lower(gm, (torch.randn(2, *tail),), backend=backend, path=tmp_path / "q", reference=model)
    tolerance = lowering_tolerance(gm)  # the runtime's int8 kernels round their own way
    if "static_shapes" in artifact.report:  # a runtime that could not keep the batch dynamic says so
        assert backend == "executorch" and "example's shapes" in artifact.report["static_shapes"]
        assert list(artifact.report["verification"]) == ["example inputs"]
        with pytest.raises(Exception):  # and refuses other batches rather than answering
            artifact.run(torch.randn(3, *tail))
        return
    assert "inputs at batch=1" in artifact.report["verification"]
    for b in BATCHES:
        x = torch.randn(b, *tail)
        out = artifact.run(x)
        out = torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out)
        assert out.shape == model(x).shape
        verdict = compare_outputs([[gm(x)]], [[out]], tolerance)
        assert verdict.ok, verdict


@pytest.mark.parametrize("backend", BACKENDS)
def test_pruned_artifacts_are_right_at_every_batch(backend, tmp_path):
    model, tail = _model("view_before_linear")
    example = (torch.randn(1, *tail),)
    gm = graphopt.optimize(model, example, "canonicalize,prune-channels{ratio=0.5,round_to=1},mobile-fp32").module
    artifact = graphopt.lower(gm, example, backend=backend, path=tmp_path / "p")
    assert set(artifact.report["verification"]) == {"example inputs", "inputs at batch=2"}
    for b in BATCHES:
        x = torch.randn(b, *tail)
        out = artifact.run(x)
        _close(torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out), gm(x))


# ------------------------------------------------------------------------------ transformers


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_bert_in_export_mode_keeps_batch_and_sequence_dynamic(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    bert = BertModel(config).eval()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]

    model = Encoder().eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    dims = {0: "batch", 1: "seq"}
    gm = graphopt.capture(model, (ids, mask), mode="export", dynamic_shapes=(dims, dims))
    # position embeddings bound the sequence: torch.export's range is kept, and enforced
    assert shapes.describe(gm) == ["input_ids: batchxseq(1..64)", "attention_mask: batchxseq(1..64)"]
    result = graphopt.optimize(gm, (ids, mask), "mobile-fp32")
    assert not result.report.failed, result.report
    artifact = graphopt.lower(result.module, (ids, mask), backend="onnx", path=tmp_path / "bert", reference=model)
    for b, s in ((1, 8), (3, 5), (5, 12)):
        i, m = torch.randint(0, 100, (b, s)), torch.ones(b, s, dtype=torch.long)
        want = model(i, m)
        _close(result.module(i, m), want)
        out = artifact.run(i, m)
        _close(torch.as_tensor(out[0] if isinstance(out, (list, tuple)) else out), want)
    with pytest.raises(InputError, match="outside the sizes"):
        result.module(torch.randint(0, 100, (1, 65)), torch.ones(1, 65, dtype=torch.long))


class PairRows(nn.Module):
    """Pads the batch to an even count: 1 and 2 rows both pad to 2, so two runs at those sizes
    look alike; p.shape[0] // 2 must not be folded to 1 (found by the property kit)."""

    def forward(self, x):
        p = torch.nn.functional.pad(x, (0, 0, 0, x.shape[0] % 2))
        g = p.view(p.shape[0] // 2, 2, p.shape[1])
        return g.flip(1).reshape(-1, x.shape[1])[:x.shape[0]]


@pytest.mark.parametrize("example_batch", [1, 2])
def test_a_size_computed_from_the_batch_is_not_folded_when_two_sizes_agree(example_batch):
    model = PairRows().eval()
    result = graphopt.optimize(model, (torch.randn(example_batch, 3),), "mobile-fp32")
    for b in (3, 4, 5):
        x = torch.randn(b, 3)
        torch.testing.assert_close(result.module(x), model(x), rtol=0, atol=0)


class PairRowsByConcat(nn.Module):
    """The same pairing by concatenating zero rows (found by a campaign). After mobile-fp32 the
    fused in-place relu hides the batch dim from fold-constants' shape rules, so only runs at
    other sizes can tell, and at batch 1 and 2 the concatenation has 2 rows either way."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1, stride=2)

    def forward(self, x):
        v = torch.relu(self.conv(x))
        p = torch.cat([v, v.new_zeros((v.shape[0] % 2, 2, 2, 2))])
        g = p.view(p.shape[0] // 2, 2, 2, 2, 2)
        return (g - g.mean(1, keepdim=True)).reshape(-1, 2, 2, 2)[:v.shape[0]]


def test_optimizing_an_optimized_graph_again_keeps_a_coinciding_size_dynamic():
    torch.manual_seed(0)
    model = PairRowsByConcat().eval()
    example = (torch.randn(1, 2, 4, 4),)
    once = graphopt.optimize(model, example, "mobile-fp32").module
    twice = graphopt.optimize(once, example, "mobile-fp32").module
    for b in (1, 2, 3, 4, 5):
        x = torch.randn(b, 2, 4, 4)
        torch.testing.assert_close(twice(x), model(x))
