"""Atomic writes and pickle-free weight loading."""
from __future__ import annotations

import os

import pytest
import torch

from graphopt.errors import ModelLoadError
from graphopt.fileio import atomic_write, load_weights


class TestAtomicWrite:
    def test_the_file_appears_complete_and_nothing_else_remains(self, tmp_path):
        target = tmp_path / "out.bin"
        with atomic_write(target) as staged:
            assert staged.name == "out.bin" and staged.parent != tmp_path
            staged.write_bytes(b"new")
            assert not target.exists()  # nothing visible until the block succeeds
        assert target.read_bytes() == b"new"
        assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    def test_a_failing_block_keeps_the_previous_file_and_removes_the_staging(self, tmp_path):
        target = tmp_path / "out.bin"
        target.write_bytes(b"old")
        with pytest.raises(RuntimeError, match="midway"):
            with atomic_write(target) as staged:
                staged.write_bytes(b"half of the new")
                raise RuntimeError("failed midway")
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    def test_side_files_move_next_to_the_file(self, tmp_path):
        with atomic_write(tmp_path / "model.onnx") as staged:
            staged.write_bytes(b"graph")
            (staged.parent / "model.onnx.data").write_bytes(b"weights")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
        assert (tmp_path / "model.onnx.data").read_bytes() == b"weights"

    def test_torch_save_can_write_to_the_staged_path(self, tmp_path):
        with atomic_write(tmp_path / "w.pt") as staged:
            torch.save({"w": torch.arange(3)}, staged)
        assert torch.equal(load_weights(tmp_path / "w.pt")["w"], torch.arange(3))

    def test_writing_nothing_is_an_error_and_keeps_the_previous_file(self, tmp_path):
        target = tmp_path / "out.bin"
        target.write_bytes(b"old")
        with pytest.raises(FileNotFoundError, match="nothing was written"):
            with atomic_write(target):
                pass
        assert target.read_bytes() == b"old"
        assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]

    def test_a_missing_directory_fails_before_the_block_runs(self, tmp_path):
        ran = []
        with pytest.raises(FileNotFoundError):
            with atomic_write(tmp_path / "missing" / "out.bin"):
                ran.append(True)
        assert ran == []

    def test_a_directory_is_not_a_file_path(self, tmp_path):
        with pytest.raises(IsADirectoryError):
            with atomic_write(tmp_path):
                pass


class TestLoadWeights:
    def test_a_state_dict_loads_on_the_cpu(self, tmp_path):
        state = {"layer.weight": torch.randn(3, 2), "layer.bias": torch.zeros(3), "meta": {"epochs": 3}}
        torch.save(state, tmp_path / "w.pt")
        loaded = load_weights(tmp_path / "w.pt")
        assert loaded.keys() == state.keys() and loaded["meta"] == {"epochs": 3}
        assert torch.equal(loaded["layer.weight"], state["layer.weight"])

    def test_a_pickle_with_arbitrary_objects_is_refused_without_running_it(self, tmp_path):
        marker = tmp_path / "payload-ran"

        class Payload:
            def __reduce__(self):
                return (os.mkdir, (str(marker),))

        torch.save({"w": torch.ones(2), "payload": Payload()}, tmp_path / "evil.pt")
        with pytest.raises(ModelLoadError, match=r"refused to load .*evil\.pt.*mkdir"):
            load_weights(tmp_path / "evil.pt")
        assert not marker.exists()

    @pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
    def test_a_corrupted_file_is_a_model_load_error(self, tmp_path, damage):
        torch.save({"w": torch.randn(64)}, tmp_path / "good.pt")
        data = (tmp_path / "good.pt").read_bytes()
        damaged = {"truncated": data[: len(data) // 2], "garbage": bytes(range(256)) * 4, "empty": b""}[damage]
        (tmp_path / "bad.pt").write_bytes(damaged)
        with pytest.raises(ModelLoadError, match="corrupted or was not written by torch.save"):
            load_weights(tmp_path / "bad.pt")

    def test_a_missing_file_is_a_model_load_error(self, tmp_path):
        with pytest.raises(ModelLoadError, match="no such file"):
            load_weights(tmp_path / "absent.pt")
