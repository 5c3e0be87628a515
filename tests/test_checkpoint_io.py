"""Atomic checkpoint writes: a save that dies half-way leaves the previous checkpoint intact and no stray file."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from codetr.lightning.checkpoint_io import AtomicCheckpointIO, atomic_torch_save, remove_interrupted_writes


def test_save_replaces_the_file_and_loads_with_weights_only(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["w"], torch.zeros(2))
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]


def test_a_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(3)}, target)

    def dying_fsync(descriptor):  # the bytes are half on disk when the "machine" dies
        raise OSError("disk gone")

    monkeypatch.setattr("codetr.lightning.checkpoint_io.os.fsync", dying_fsync)
    with pytest.raises(OSError, match="disk gone"):
        atomic_torch_save({"w": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_unserialisable_checkpoint_never_touches_the_disk(tmp_path):
    target = tmp_path / "last.ckpt"
    atomic_torch_save({"w": torch.ones(1)}, target)
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on the pickler
        atomic_torch_save({"w": lambda: None}, target)
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.ones(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_storage_options_are_rejected_by_name(tmp_path):
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, tmp_path / "x.ckpt", storage_options={"a": 1})


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_checkpoints_follow_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == mode


def test_files_left_by_a_killed_write_are_recognised_and_removed(tmp_path, monkeypatch):
    def killed(*args):  # the process "dies" before the rename; the except clause never runs after a SIGKILL
        raise SystemExit

    monkeypatch.setattr("codetr.lightning.checkpoint_io.os.replace", killed)
    monkeypatch.setattr("codetr.lightning.checkpoint_io.Path.unlink", lambda *a, **k: None)
    with pytest.raises(SystemExit):
        atomic_torch_save({"w": torch.ones(1)}, tmp_path / "last.ckpt")
    monkeypatch.undo()
    assert len(list(tmp_path.iterdir())) == 1
    assert len(remove_interrupted_writes(tmp_path)) == 1 and not list(tmp_path.iterdir())
