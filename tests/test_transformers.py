"""Hugging Face models, small random configs (no download): capture with the default mode falls
back to torch.export where symbolic tracing cannot follow transformers' code, keeps the batch
dynamic, and the result is verified through mobile-fp32 and in ONNX Runtime at two batch sizes."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import graphopt
from graphopt.ir import shapes
from graphopt.capture import capture_notes, front_end

T = pytest.importorskip("transformers", reason="transformers is not installed (pip install 'graphopt[test]')")

# the configs of examples/transformers_small_models.py (one source for the example and the tests)
_spec = importlib.util.spec_from_file_location(
    "transformers_small_models", Path(__file__).resolve().parent.parent / "examples" / "transformers_small_models.py")
SMALL_MODELS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(SMALL_MODELS)
SMALL = SMALL_MODELS.SMALL
MODELS = {name: SMALL_MODELS.MODELS[name] for name in ("bert", "gpt2", "vit")}


def _logits(out):
    return out["logits"] if "logits" in out else out["last_hidden_state"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_captured_optimized_and_lowered_with_a_dynamic_batch(name, tmp_path):
    torch.manual_seed(0)
    make, inputs = MODELS[name]
    model, example = make().eval(), inputs()
    gm = graphopt.capture(model, example)
    used = front_end(gm)
    assert used["front_end"] == "torch.export" and "symbolically" in used["symbolic_failure"]
    assert shapes.describe(gm)[0].split(":")[1].strip().startswith("batch")
    result = graphopt.optimize(gm, example, "mobile-fp32")
    assert not result.report.failed and result.report.final_verdict.ok, result.report
    artifact = graphopt.lower(result.module, example, backend="onnx", path=tmp_path / name, reference=model)
    assert set(artifact.report["verification"]) == {"example inputs", "inputs at batch=1"}
    for batch in (1, 3):
        x = tuple(t[:1].repeat(batch, *[1] * (t.dim() - 1)) for t in inputs())
        original = model(*x)
        want = _logits(original)
        optimized = result.module(*x)
        assert type(optimized) is type(original)  # the model's ModelOutput, not export's dict
        torch.testing.assert_close(_logits(optimized), want, rtol=1e-4, atol=1e-5)
        got = artifact.run(*x)
        assert type(got) is type(original)
        got = _logits(got)
        torch.testing.assert_close(torch.as_tensor(got), want, rtol=1e-4, atol=1e-5)


def test_the_report_says_which_front_end_captured_and_why():
    torch.manual_seed(0)
    make, inputs = MODELS["vit"]
    result = graphopt.optimize(make().eval(), inputs(), "eliminate-dead-code")
    assert any(note.startswith("captured with torch.export: symbolic tracing failed") for note in result.report.notes)


def test_keyword_inputs_as_hugging_face_models_are_called(tmp_path):
    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=100, max_position_embeddings=64, num_labels=3, **SMALL)
    model = T.BertForSequenceClassification(config).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    example = {"input_ids": ids, "attention_mask": mask}
    result = graphopt.optimize(model, example, "mobile-fp32")
    assert result.report.shapes == ["input_ids: batchx8", "attention_mask: batchx8"]
    assert result.report.final_verdict.ok
    i3, m3 = torch.randint(0, 100, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    out = result.module(input_ids=i3, attention_mask=m3)  # called by keyword, as the model is
    assert type(out) is T.modeling_outputs.SequenceClassifierOutput
    torch.testing.assert_close(out.logits, model(input_ids=i3, attention_mask=m3).logits)
    with pytest.raises(graphopt.InputError, match="input 'input_ids' dim 1 is 9"):  # keywords are guarded too
        result.module(input_ids=torch.randint(0, 100, (3, 9)), attention_mask=torch.ones(3, 9, dtype=torch.long))
    artifact = graphopt.lower(result.module, example, backend="onnx", path=tmp_path / "bert", reference=model)
    assert set(artifact.report["verification"]) == {"example inputs", "inputs at batch=1"}
    # input_ids skipped takes its default (None), and the model itself says what it lacks
    with pytest.raises(graphopt.InputError, match="You must specify exactly one of input_ids or inputs_embeds"):
        graphopt.capture(model, {"attention_mask": mask})
    with pytest.raises(graphopt.InputError, match="'labels_typo'"):
        graphopt.capture(model, {"input_ids": ids, "labels_typo": ids})


def test_keyword_inputs_may_skip_an_optional_parameter_as_gpt2_is_called():
    # GPT2LMHeadModel.forward(input_ids, past_key_values / cache, ..., attention_mask, ...): users pass
    # input_ids= and attention_mask=, leaving the cache between them at its default
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           use_cache=False)).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, -3:] = 0  # a right-padded row: the mask matters
    example = {"input_ids": ids, "attention_mask": mask}
    result = graphopt.optimize(model, example, "mobile-fp32")
    assert result.report.final_verdict.ok and not result.report.failed
    placeholders = [n.name for n in result.module.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["input_ids", "attention_mask"]
    out = result.module(input_ids=ids, attention_mask=mask)  # called as the model is, the cache left out
    assert type(out) is T.modeling_outputs.CausalLMOutputWithCrossAttentions
    torch.testing.assert_close(out.logits, model(input_ids=ids, attention_mask=mask).logits)
    with pytest.raises(graphopt.InputError, match="the graph was captured with None there"):
        result.module(ids, torch.zeros(1), mask)  # a cache given where the capture had none


def test_left_padded_gpt2_lowers_to_onnx_with_the_padding_rows_as_torch_computes_them(tmp_path):
    """Left padding under the causal mask leaves each padding position no key to attend to:
    torch gives those rows zeros, ONNX's softmax the mean of the values. The file must agree
    with the model everywhere, padding positions included."""
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           use_cache=False)).eval()
    ids, mask = torch.randint(0, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    example = {"input_ids": ids, "attention_mask": mask}
    result = graphopt.optimize(model, example, "mobile-fp32")
    artifact = graphopt.lower(result.module, example, backend="onnx", path=tmp_path / "gpt2", reference=model)
    assert artifact.verdict.ok
    assert any("allows no key" in n for n in artifact.report["notes"])
    got = artifact.run(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(got.logits, model(input_ids=ids, attention_mask=mask).logits, atol=1e-5, rtol=1e-4)
    assert not any(n.target is torch.where for n in result.module.graph.nodes)  # the graph module is untouched


def test_keyword_inputs_that_skip_a_required_parameter_are_refused_by_name():
    class TwoRequired(torch.nn.Module):
        def forward(self, x, scale, bias=None):
            return x * scale if bias is None else x * scale + bias

    with pytest.raises(graphopt.InputError, match="skip scale, which forward needs \\(no default\\)"):
        graphopt.capture(TwoRequired(), {"x": torch.ones(2), "bias": torch.ones(2)})


def test_a_decoder_returning_a_cache_is_captured_with_use_cache_off_and_the_report_says_so(tmp_path):
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    ids = torch.randint(0, 100, (2, 8))
    assert model.config.use_cache  # the default: the model returns logits and a DynamicCache
    assert any(isinstance(v, T.cache_utils.Cache) for v in model(ids).values())
    gm = graphopt.capture(model, (ids,))
    (note,) = capture_notes(gm)
    assert note.startswith("use_cache=False chosen: GPT2LMHeadModel returns a key/value cache")
    assert model.config.use_cache  # chosen on capture's copy; the user's model is unchanged
    out = gm(ids)
    assert type(out) is T.modeling_outputs.CausalLMOutputWithCrossAttentions and list(out) == ["logits"]
    want = model(ids, use_cache=False).logits
    torch.testing.assert_close(out.logits, want)

    result = graphopt.optimize(model, (ids,), "mobile-fp32")
    assert note in result.report.notes
    assert result.report.final_verdict.ok and not result.report.failed
    artifact = graphopt.lower(result.module, (ids,), backend="onnx", path=tmp_path / "gpt2")
    assert note in artifact.report["notes"]
    torch.testing.assert_close(torch.as_tensor(artifact.run(ids).logits), want, rtol=1e-4, atol=1e-5)


def test_onnx_inputs_and_outputs_are_named_after_the_parameters_and_model_output_fields(tmp_path):
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    config = T.BertConfig(vocab_size=100, max_position_embeddings=64, output_hidden_states=True, **SMALL)
    model = T.BertModel(config).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    artifact = graphopt.lower(model, example, backend="onnx", path=tmp_path / "bert", reference=model)
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    names = [o.name for o in session.get_outputs()]
    assert names == ["last_hidden_state", "pooler_output", "hidden_states.0", "hidden_states.1", "hidden_states.2"]
    ids, mask = torch.randint(0, 100, (3, 8)), torch.ones(3, 8, dtype=torch.long)
    mask[0, 5:] = 0
    got = dict(zip(names, session.run(names, {"attention_mask": mask.numpy(), "input_ids": ids.numpy()})))
    want = model(input_ids=ids, attention_mask=mask)
    for name in ("last_hidden_state", "pooler_output"):
        torch.testing.assert_close(torch.from_numpy(np.asarray(got[name])), want[name], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(got["hidden_states.1"]), want.hidden_states[1], rtol=1e-4, atol=1e-5)

    make, inputs = MODELS["vit"]
    vit = make().eval()
    artifact = graphopt.lower(vit, inputs(), backend="onnx", path=tmp_path / "vit")
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    assert [o.name for o in session.get_outputs()] == ["logits"]


@pytest.mark.parametrize("name,dims", [("bert", "batch"), ("distilbert", "batch"), ("bert", [{0: "batch", 1: "seq"}])])
def test_onnx_falls_back_to_the_dynamo_exporter_when_the_trace_fails_or_bakes_sizes_in_and_says_so(name, dims, tmp_path):
    """The TorchScript exporter traces: on these graphs it either fails (arange over a symbolic
    size) or writes the example's batch into the reshapes (after mobile-fp32, batch dynamic);
    the file then comes from the dynamo exporter, the report says why, and it is verified, and
    right, at other batch sizes (and sequence lengths)."""
    torch.manual_seed(0)
    make, inputs = SMALL_MODELS.MODELS[name]
    model, example = make().eval(), inputs()
    result = graphopt.optimize(graphopt.capture(model, example, dynamic_shapes=dims), example, "mobile-fp32")
    artifact = graphopt.lower(result.module, example, backend="onnx", path=tmp_path / name, reference=model)
    report = artifact.report
    assert report["exporter"] == "dynamo" and "fell back" in report["summary"]
    assert report["exporter_fallback"].startswith("the torchscript exporter failed: ")
    if dims == "batch":  # the trace ran, with the example's batch written into the file
        assert "the trace holds the example's sizes" in report["exporter_fallback"]
    second = "inputs at batch=1" + ("" if dims == "batch" else ", seq=1")
    assert set(report["verification"]) == {"example inputs", second}
    assert all(v["ok"] for v in report["verification"].values())
    for size in ((1, 8), (3, 8)) if dims == "batch" else ((1, 5), (3, 11)):
        x = (torch.randint(0, 100, size),)
        torch.testing.assert_close(torch.as_tensor(_logits(artifact.run(*x))), _logits(model(*x)), rtol=1e-4, atol=1e-5)
