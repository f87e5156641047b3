"""The benchmark harness keeps working: its quick mode on the smallest model writes a JSON and a
Markdown report with real rows, records a broken model as a failed row and goes on, and joins the
ExecuTorch benchmark's tables (or its reason for having none); the goal verdicts and the reading
of other benchmarks' accuracy figures are right."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # `benchmarks` is a folder of the repo, not an installed package
    sys.path.insert(0, str(REPO))

from benchmarks import bench_executorch, bench_fp32, report  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    out = tmp_path_factory.mktemp("bench")
    command = [sys.executable, "-m", "benchmarks.run", "--quick", "--models", "mlp,no_such_model",
               "--threads", "1", "--runs", "2", "--sections", "latency,executorch", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "bench.json").read_text()), (out / "report.md").read_text(), out


class TestQuickRun:
    def test_rows_of_graphopt_and_peers_are_timed(self, quick_run):
        results, _, _ = quick_run
        rows = {r["key"]: r for r in results["rows"] if r["model"] == "mlp"}
        for key in ("eager", "mobile-fp32/eager", "mobile-fp32/ort-all", "mobile-fp32/ort-off", "mobile-fp32/ptl",
                    "fx-fuse", "jit-freeze", "jit-freeze/ptl", "onnx-plain/ort-all"):
            assert rows[key]["status"] == "ok", (key, rows[key]["reason"])
            assert rows[key]["latency_ms"]["1"] > 0
            assert rows[key]["speedup"]["1"] > 0
        assert rows["eager"]["speedup"]["1"] == 1.0
        assert rows["mobile-fp32/ort-all"]["artifact_bytes"] > 60_000  # the MLP's 17k float weights are in the file
        assert rows["mobile-fp32/eager"]["parameters"] == rows["eager"]["parameters"] == 17_226
        assert rows["mobile-fp32/eager"]["macs"] == 4 * (64 * 128 + 128 * 64 + 64 * 10)
        assert rows["mobile-fp32/eager"]["max_abs_error"] < 1e-5
        assert rows["mobile-fp32/eager"]["pipeline_s"] > 0

    def test_a_model_that_fails_is_a_row_with_the_reason(self, quick_run):
        results, report_md, _ = quick_run
        failed = [r for r in results["rows"] if r["model"] == "no_such_model"]
        assert len(failed) == 1 and failed[0]["status"] == "failed"
        assert "no built-in example named 'no_such_model'" in failed[0]["reason"]
        assert "| no_such_model | eager fp32 | failed |" in report_md

    def test_environment_is_recorded(self, quick_run):
        env = quick_run[0]["environment"]
        assert env["versions"]["torch"] and env["versions"]["onnxruntime"] and env["cpu"]
        assert env["threads"] == [1]
        assert env["load_samples"] and all(len(sample) == 3 for sample in env["load_samples"])

    def test_markdown_report_and_headline_hold_the_rows(self, quick_run):
        results, report_md, out = quick_run
        assert "### mlp" in report_md
        assert "| graphopt mobile-fp32, ORT all | ONNX Runtime |" in report_md
        headline = (out / "README-headline.md").read_text()
        assert "| path | mlp | no_such_model |" in headline
        assert "| graphopt mobile-fp32, eager |" in headline
        assert results["environment"]["date"][:10] in headline

    def test_goals_are_checked(self, quick_run):
        goals = quick_run[0]["goals"]
        assert {g["issue"] for g in goals} == {"3", "4"}
        assert all(g["verdict"] in ("met", "missed", "missed, within noise") for g in goals)

    def test_executorch_section_joins_the_report(self, quick_run):
        results, report_md, out = quick_run
        ran = results["external"]["bench_executorch"]
        assert ran["status"] == "ran", ran.get("reason")
        assert "--quick" in ran["command"] and "--threads 1" in ran["command"]
        data = ran["json"]["executorch_quick.json"]
        assert [m["model"] for m in data["models"]] == ["resnet_cnn", "mobilenet_cnn"]
        before, section = report_md.split("\n## ExecuTorch\n")
        assert "bench_executorch" not in before  # its own section, not under quantization and pruning
        assert "### bench_executorch: ran" in section.split("\n## Scaling")[0]
        if data["unavailable"]:  # no executorch package: every row says why, and nothing else broke
            assert all(r["status"] == "unavailable" for m in data["models"] for r in m["rows"])
            return
        for model in data["models"]:
            rows = {r["key"]: r for r in model["rows"]}
            assert set(rows) == {f.key for f in bench_executorch.FLOWS}
            for key, row in rows.items():
                assert row["status"] == "ok", (model["model"], key, row["reason"])
                assert row["latency_ms"]["1"] > 0 and row["pte_bytes"] > 1000
                assert row["xnnpack_ops"] > 0
            assert rows["et-fp32"]["vs_et_fp32"]["1"] == 1.0
            assert rows["graphopt-fp32"]["max_abs_error"] < 1e-3 and rows["graphopt-int8"]["sqnr_db"] > 20
            assert rows["graphopt-int8"]["pte_bytes"] < rows["graphopt-fp32"]["pte_bytes"] / 1.5  # int8 weights
        digits = {r["key"]: r for r in data["digits"]["rows"]}
        assert digits["et-int8"]["accuracy"] > 90 and digits["graphopt-int8"]["accuracy"] > 90
        assert "| graphopt int8, config xnnpack |" in report_md
        assert (out / "executorch" / "executorch_quick.md").exists()


def _row(key: str, ms: float, model: str = "m") -> dict:
    return {"model": model, "key": key, "label": key, "status": "ok", "latency_ms": {"1": ms}, "speedup": {}}


class TestGoals:
    def test_best_peer_sets_the_bar(self):
        rows = [_row("mobile-fp32/eager", 10.0), _row("fx-fuse", 12.0), _row("jit-freeze", 9.5)]
        (goal,) = bench_fp32.goals(rows)
        assert goal["best_peer"] == "jit-freeze" and goal["verdict"] == "missed, within noise"
        assert goal["ratio"] == pytest.approx(0.95)

    def test_met_and_missed(self):
        rows = [_row("mobile-fp32/ort-all", 5.0), _row("onnx-plain/ort-all", 5.0),
                _row("mobile-fp32/ptl", 10.0), _row("jit-freeze", 8.0)]
        verdicts = {g["goal"]: g["verdict"] for g in bench_fp32.goals(rows)}
        assert verdicts["ORT all: graphopt export at least as fast as plain export"] == "met"
        assert verdicts["lite interpreter .ptl at least as fast as jit.freeze of the original"] == "missed"


def test_accuracy_points_read_absolute_and_relative_sizes():
    data = {"digits": [{"tool": "original", "accuracy": 0.99, "parameters_x": 1.0},
                       {"tool": "graphopt", "accuracy_pruned": 0.5, "accuracy_finetuned": 0.98, "bytes_x": 0.27}],
            "int8": [{"variant": "graphopt int8", "accuracy": 0.985, "bytes": 5000, "bytes_x": 0.26}],
            "speed": [{"model": "resnet18", "eager_ms": 3.0}]}
    points = report.accuracy_points(data)
    assert {(p["label"], p["accuracy"], p["size"], p["relative"]) for p in points} == {
        ("original", 0.99, 1.0, True), ("graphopt pruned", 0.5, 0.27, True),
        ("graphopt finetuned", 0.98, 0.27, True), ("graphopt int8", 0.985, 5000, False)}


def test_measure_sees_torch_allocations():
    import torch

    _, step = bench_fp32.measure(lambda: torch.ones(16 * 2**20 // 4).add_(1))  # 16 MiB
    if step.peak_rss_bytes is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert step.peak_rss_bytes >= 15 * 2**20


class TestExecuTorchBenchmark:
    def test_without_executorch_every_row_is_unavailable_with_the_reason(self, tmp_path, monkeypatch, capsys):
        from graphopt.backends import executorch as backend
        from graphopt.errors import LoweringError

        def missing():
            raise LoweringError("executorch: the executorch package is not installed (No module named 'executorch')")

        monkeypatch.setattr(backend, "executorch_modules", missing)
        assert bench_executorch.main(["--quick", "--models", "mlp", "--out", str(tmp_path)]) == 0
        data = json.loads((tmp_path / "executorch_quick.json").read_text())
        (model,) = data["models"]
        assert [r["status"] for r in model["rows"]] == ["unavailable"] * len(bench_executorch.FLOWS)
        assert all("not installed" in r["reason"] for r in model["rows"])
        assert data["digits"]["status"] == "unavailable" and data["goals"] == []
        assert "unavailable: executorch: the executorch package is not installed" in \
            (tmp_path / "executorch_quick.md").read_text()

    def test_calibration_batches_are_cut_to_the_exported_shape(self):
        import torch

        batches = [(torch.arange(5.0).reshape(5, 1),), (torch.arange(5.0, 9.0).reshape(4, 1),)]
        fitted = bench_executorch.fitted_batches(batches, (torch.zeros(2, 1),))
        assert [b[0].flatten().tolist() for b in fitted] == [[0, 1], [2, 3], [5, 6], [7, 8]]

    def test_goals_compare_each_graphopt_flow_with_its_executorch_rival(self):
        def row(key, ms, sqnr=None, precision="fp32"):
            return {"key": key, "label": key, "status": "ok", "precision": precision, "latency_ms": {"1": ms},
                    "sqnr_db": sqnr}

        models = [{"model": "m", "rows": [row("et-fp32", 10.0), row("graphopt-fp32", 9.0),
                                          row("et-int8", 4.0, 30.0, "int8"), row("graphopt-int8", 4.2, 31.0, "int8"),
                                          row("graphopt-int8-x86", 6.0, 25.0, "int8")]}]
        digits = {"rows": [{"key": "et-int8", "variant": "et", "accuracy": 98.0},
                           {"key": "graphopt-int8", "variant": "go", "accuracy": 97.5}]}
        verdicts = {(g["graphopt"], g["goal"]): g["verdict"] for g in bench_executorch.goals(models, digits)}
        assert verdicts == {
            ("graphopt-fp32", "at least as fast"): "met",
            ("graphopt-int8", "at least as fast"): "missed, within noise",
            ("graphopt-int8", "SQNR vs eager fp32 at least as high"): "met",
            ("graphopt-int8-x86", "at least as fast"): "missed",
            ("graphopt-int8-x86", "SQNR vs eager fp32 at least as high"): "missed",
            ("go", "digits accuracy at least as high"): "missed",
        }


class TestAccuracyBenchmark:
    """The builders of benchmarks/bench_accuracy.py (its quick run takes minutes: too long here)."""

    def test_synthetic_images_are_cifar_sized_and_fixed_by_the_seed(self):
        import torch

        from benchmarks import bench_accuracy

        x, y = bench_accuracy.shapes_data(300, seed=3)
        again, labels = bench_accuracy.shapes_data(300, seed=3)
        other, _ = bench_accuracy.shapes_data(300, seed=4)
        assert x.shape == (300, 3, 32, 32) and x.dtype == torch.float32
        assert torch.equal(x, again) and torch.equal(y, labels) and not torch.equal(x, other)
        assert set(y.tolist()) == set(range(10))

    def test_mnist1d_comes_from_its_seeded_generator_and_leaves_numpy_alone(self):
        import numpy as np
        import torch

        pytest.importorskip("mnist1d", reason="the bench extra's mnist1d")
        from benchmarks import bench_accuracy

        np.random.seed(7)
        state = np.random.get_state()[1].copy()
        x_train, y_train, x_test, _ = bench_accuracy.mnist1d_data(500)
        assert (np.random.get_state()[1] == state).all()
        assert x_train.shape == (400, 1, 40) and x_test.shape == (100, 1, 40) and y_train.dtype == torch.int64
        assert torch.equal(bench_accuracy.mnist1d_data(500)[0], x_train)
        assert not torch.equal(bench_accuracy.mnist1d_data(500, seed=1)[0], x_train)

    def test_without_mnist1d_the_task_says_how_to_install_it(self, monkeypatch):
        from benchmarks import bench_accuracy, peers

        monkeypatch.setitem(sys.modules, "mnist1d.data", None)  # makes the import fail
        with pytest.raises(peers.Unavailable, match=r"pip install mnist1d"):
            bench_accuracy.mnist1d_data(100)

    def test_the_outlier_channel_is_what_costs_plain_min_max(self, tmp_path):
        """A briefly trained model and its twin with the gain moved into the next layer's weights
        compute the same function; min-max int8 (ORT's quantize_static) does worse on the first."""
        import torch

        from benchmarks import bench_accuracy, bench_quantize

        x, y = bench_accuracy.shapes_data(1200, seed=1)
        torch.manual_seed(0)
        model = bench_accuracy.train(bench_accuracy.ShapesNet(), x[:1000], y[:1000], epochs=3)
        gain, depthwise = model.features[5], model.features[6][0]
        twin = bench_accuracy.ShapesNet(gain=1.0)
        twin.load_state_dict({**model.state_dict(), "features.5.scale": torch.ones_like(gain.scale)})
        with torch.no_grad():
            twin.features[6][0].weight[0] = depthwise.weight[0] * gain.scale[0, 0]
            reference, same = model(x[1000:]), twin.eval()(x[1000:])
            ranges = model.features[:6](x[1000:]).amax((0, 2, 3))
        torch.testing.assert_close(same, reference, rtol=1e-4, atol=1e-4)
        assert ranges[0] > 5 * ranges[1:].max()  # one channel far beyond the others
        calibration = bench_accuracy.calibration_batches(x[:1000])[:-1]
        sqnr = {}
        for name, m in (("outlier", model), ("twin", twin)):
            fp32 = bench_quantize.export_onnx(m, x[:2], tmp_path / f"{name}.onnx", dynamic_batch=True)
            int8 = bench_quantize.ort_quantize_static(fp32, tmp_path / f"{name}-int8.onnx", calibration, u8s8=False)
            sqnr[name] = bench_quantize.sqnr_db(reference.numpy(), bench_quantize.ort_session(int8)(x[1000:]))
        assert sqnr["outlier"] < sqnr["twin"] - 3, sqnr

    def test_goals_take_graphopt_best_row_and_the_best_peer(self):
        from benchmarks import bench_accuracy

        def row(key, tool, accuracy, sqnr, status="ok"):
            return {"key": key, "variant": key, "tool": tool, "accuracy": accuracy, "sqnr_db": sqnr, "status": status}

        rows = [row("fp32", "fp32", 80.0, 120.0), row("minmax", "graphopt", 77.0, 15.0),
                row("mse", "graphopt", 79.8, 26.0), row("accurate", "graphopt", None, None, "not available"),
                row("ort", "onnxruntime", 78.5, 19.0), row("fx", "torch.ao", 78.9, 22.0)]
        within, ahead = bench_accuracy.goals(rows)
        assert within["graphopt"] == "mse" and within["verdict"] == "met"
        assert ahead["peer"] == "fx" and ahead["verdict"] == "met"  # 0.9 points, but 4 dB ahead
        rows[2] = row("mse", "graphopt", 79.6, 24.0)  # 0.7 points and 2 dB ahead: neither is enough
        within, ahead = bench_accuracy.goals(rows)
        assert within["verdict"] == "missed" and ahead["verdict"] == "missed"
        rows[-1] = row("fx", "torch.ao", 79.5, 22.0)  # the best peer loses only 0.5 points
        assert bench_accuracy.goals(rows)[1]["verdict"].startswith("not applicable")
        rows.append({**row("keep-float", "graphopt", 80.0, 30.0), "mixed_precision": True})
        within = bench_accuracy.goals(rows)[0]
        assert within["graphopt"] == "keep-float" and within["verdict"] == "met"
        assert within["detail"].endswith("best all-int8 row mse 79.60%")

    def test_a_task_gives_a_row_per_method_and_failures_stay_rows(self, tmp_path):
        import torch

        from benchmarks import bench_accuracy
        from benchmarks.bench_accuracy import Method

        x, y = bench_accuracy.shapes_data(400, seed=5)
        torch.manual_seed(0)
        task = bench_accuracy.Task("tiny", "untrained", bench_accuracy.ShapesNet(gain=1.0).eval(), x[:300], y[:300],
                                   x[300:], y[300:])
        by_key = {m.key: m for m in bench_accuracy.METHODS}
        methods = (by_key["fp32"], by_key["graphopt-histogram"], by_key["ort-s8s8"],
                   Method("missing", "a preset this build lacks", "graphopt", "no-such-preset"),
                   Method("broken", "a tool nobody wrote", "nobody"))
        result = bench_accuracy.bench_task(task, methods, tmp_path, rounds=1, calls=2)
        rows = {r["key"]: r for r in result["rows"]}
        assert list(rows) == ["fp32", "graphopt-histogram", "ort-s8s8", "missing", "broken"]
        with torch.no_grad():
            eager = float((task.model(task.x_test).argmax(1) == task.y_test).double().mean() * 100)
        assert rows["fp32"]["accuracy"] == pytest.approx(eager) and rows["fp32"]["sqnr_db"] > 80
        for key in ("graphopt-histogram", "ort-s8s8"):
            assert rows[key]["status"] == "ok" and rows[key]["runtime"] == "ONNX Runtime"
            assert 20 < rows[key]["sqnr_db"] < 80 and rows[key]["latency_ms"] > 0
            assert rows[key]["bytes"] < rows["fp32"]["bytes"] / 1.3  # int8 weights
        assert rows["missing"]["status"] == "not available"
        assert rows["missing"]["reason"].startswith("not available in this build: unknown pass 'no-such-preset'")
        assert rows["broken"]["status"] == "failed" and "nobody" in rows["broken"]["reason"]
        text = bench_accuracy.markdown({"quick": True, "machine": "m", "versions": {}, "tasks": [result]})
        assert "| a preset this build lacks | not available |" in text


CORPUS_COMMAND = ["-m", "benchmarks.bench_corpus", "--models", "hf:bert", "--stages",
                  "capture,mobile-fp32,lite,torch.export"]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path, str]:
    out = tmp_path_factory.mktemp("corpus")
    done = subprocess.run([sys.executable, *CORPUS_COMMAND, "--out", str(out)], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "corpus.json").read_text()), (out / "corpus.md").read_text(), out, done.stderr


class TestCorpus:
    """benchmarks/bench_corpus.py: a model per process, statuses that say what happened, resumable."""

    def test_each_asked_stage_has_a_status_and_a_time(self, corpus_run):
        results, _, _, _ = corpus_run
        record = results["models"]["hf:bert"]
        assert record["inputs"] == "input_ids + attention_mask (2, 8)"
        for stage in ("capture", "mobile-fp32", "lite"):
            assert record["stages"][stage]["status"] == "ok", record["stages"][stage]
            assert record["stages"][stage]["seconds"] > 0
        assert record["stages"]["lite"]["detail"].startswith("verified on ")
        assert record["peers"]["torch.export"]["status"] == "ok"
        for stage in ("onnx", "int8-onnx", "prune"):
            assert record["stages"][stage]["status"] == "not run"
            assert "--stages" in record["stages"][stage]["detail"]

    def test_summary_counts_and_table(self, corpus_run):
        results, table, _, _ = corpus_run
        rates = results["summary"]["rates"]
        assert rates["capture"]["ok"] == 1 and rates["capture"]["ok_rate"] == 1.0
        assert rates["onnx"]["not run"] == 1 and rates["onnx"]["ok_rate"] is None
        assert results["summary"]["median_capture_fp32_vs_export"] > 0
        assert results["summary"]["median_onnx_vs_dynamo"] is None  # neither was asked for
        assert "| hf:bert | input_ids + attention_mask (2, 8) |" in table
        assert "| capture | 1 | 0 | 0 | 0 | 0 | 100% |" in table

    def test_a_second_run_skips_models_already_in_the_file(self, corpus_run):
        results, _, out, stderr = corpus_run
        assert "[1/1] hf:bert" in stderr
        done = subprocess.run([sys.executable, *CORPUS_COMMAND, "--out", str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert done.returncode == 0, done.stderr[-2000:]
        assert "hf:bert" not in done.stderr
        again = json.loads((out / "corpus.json").read_text())
        assert again["models"]["hf:bert"] == results["models"]["hf:bert"]

    def test_runs_sharing_a_results_file_keep_each_others_models(self, tmp_path):
        from benchmarks import bench_corpus

        path = tmp_path / "corpus.json"
        mine = {"models": {"hf:a": {"name": "hf:a"}}}
        held = mine["models"]  # run_corpus keeps adding to this dict between saves
        bench_corpus.save(mine, path)
        bench_corpus.save({"models": {"timm:b": {"name": "timm:b"}}}, path)
        held["hf:c"] = {"name": "hf:c"}
        bench_corpus.save(mine, path)
        assert set(json.loads(path.read_text())["models"]) == {"hf:a", "timm:b", "hf:c"}
        assert list(tmp_path.iterdir()) == [path]

    def test_of_two_records_of_a_model_the_later_one_wins(self, tmp_path):
        from benchmarks import bench_corpus

        path = tmp_path / "corpus.json"
        old_run = {"models": {"tv:m": {"name": "tv:m", "finished_at": 1.0}}}
        bench_corpus.save({"models": {"tv:m": {"name": "tv:m", "finished_at": 2.0, "rerun": True}}}, path)
        bench_corpus.save(old_run, path)  # the long run saves its own, older record afterwards
        assert json.loads(path.read_text())["models"]["tv:m"]["rerun"] is True

    def test_statuses_of_exceptions(self):
        from benchmarks import bench_corpus
        from graphopt.errors import CaptureError, LoweringError, VerificationError

        assert bench_corpus.classify(CaptureError("cannot trace\nmore"))[0] == "declined"
        assert bench_corpus.classify(CaptureError("cannot trace\nmore"))[1] == "CaptureError: cannot trace"
        wrong = LoweringError("onnx: ONNX Runtime gives different results from the graph on the example inputs")
        assert bench_corpus.classify(wrong)[0] == "wrong"
        assert bench_corpus.classify(VerificationError("broke its contract"))[0] == "wrong"
        assert bench_corpus.classify(ValueError("boom")) == ("crash", "ValueError: boom")

    def test_a_missing_family_is_not_run_with_the_install_hint(self, monkeypatch):
        import importlib

        from benchmarks import bench_corpus

        def no_timm(name):
            raise ImportError(f"No module named {name!r}")

        monkeypatch.setattr(importlib, "import_module", no_timm)
        reason = bench_corpus.family_available("timm")
        assert reason.startswith("not run: timm does not import") and "pip install timm" in reason

    def test_goals_use_the_medians_of_the_time_ratios(self):
        from benchmarks import bench_corpus

        def record(name, capture, fp32, export, onnx, dynamo, int8="ok"):
            stages = {s: {"status": "ok", "seconds": 1.0} for s in bench_corpus.STAGES}
            stages["capture"]["seconds"], stages["mobile-fp32"]["seconds"] = capture, fp32
            stages["onnx"]["seconds"], stages["int8-onnx"]["status"] = onnx, int8
            return {"name": name, "stages": stages, "peers": {"torch.export": {"status": "ok", "seconds": export},
                                                              "onnx dynamo": {"status": "ok", "seconds": dynamo}}}

        models = {"a": record("a", 1.0, 1.0, 1.0, 1.0, 2.0), "b": record("b", 3.0, 1.0, 1.0, 3.0, 2.0, "declined"),
                  "c": record("c", 5.0, 1.0, 1.0, 2.0, 1.0, "crash")}
        summary = bench_corpus.summarize({"models": models})
        assert summary["median_capture_fp32_vs_export"] == 4.0  # ratios 2, 4, 6
        assert summary["median_onnx_vs_dynamo"] == 1.5  # ratios 0.5, 1.5, 2
        met = {g["goal"].split(" ")[0]: g["met"] for g in summary["goals"]}
        assert met == {"100%": True, "int8": False, "0": False, "capture": False, "ONNX": False}
        assert summary["rates"]["int8-onnx"] == {"ok": 1, "declined": 1, "crash": 1, "wrong": 0, "not run": 0,
                                                 "ran": 3, "ok_rate": 1 / 3}
