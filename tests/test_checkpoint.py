"""Checkpoints: atomic writes, safe loads, clear errors, inference loading, RNG round trip."""

from __future__ import annotations

import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from medcli.engine import checkpoint as ck
from medcli.errors import CheckpointError


def _tiny_checkpoint(head: str = "linear", ema: bool = True, seed: int = 0) -> dict:
    from medcli.data.preprocess import PreprocessConfig
    from medcli.engine.config import TrainConfig
    from medcli.models import create_model

    torch.manual_seed(seed)
    cfg = TrainConfig(depth="tiny", input_size=16, dropout=0.1, head=head)
    model = create_model("tiny", dropout=0.1, head=head)
    ema_state = None
    if ema:
        ema_state = {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return {
        "format": ck.FORMAT,
        "model": model.state_dict(),
        "ema": ema_state,
        "optimizer": {},
        "scheduler": {},
        "scaler": {},
        "epoch": 3,
        "global_step": 12,
        "rng": ck.capture_rng(),
        "best_metric": 0.75,
        "config": cfg.to_dict(),
        "preprocess": PreprocessConfig(input_size=(16, 16, 16)).to_dict(),
        "class_names": ["LGG", "HGG"],
        "fold": 0,
        "split_hash": "abc",
        "provenance": {
            "pretrained_sha256": None,
            "medcli_version": "0",
            "torch_version": "x",
            "created": "t",
        },
    }


def test_roundtrip_and_load_for_inference(tmp_path):
    blob = _tiny_checkpoint(head="cosine")
    path = tmp_path / "best.pt"
    ck.atomic_save(blob, path)
    model, pre, meta = ck.load_for_inference(path, weights="raw")
    assert not model.training and model.head_type == "cosine"
    for k, v in blob["model"].items():
        assert torch.equal(model.state_dict()[k], v), k
    assert tuple(pre.input_size) == (16, 16, 16)
    assert meta["weights"] == "raw" and meta["epoch"] == 3 and meta["has_ema"]
    assert meta["logit_scale"] == 30.0  # cosine head: softmax(s * cos)
    assert "model" not in meta and "optimizer" not in meta

    ema_model, _, meta = ck.load_for_inference(path, weights="ema")
    assert meta["weights"] == "ema"
    assert torch.equal(ema_model.conv1.weight, blob["ema"]["conv1.weight"])
    out = ema_model(torch.randn(1, 1, 16, 16, 16))
    assert out.shape == (1, 2)


def test_ema_falls_back_to_raw_when_absent(tmp_path):
    path = tmp_path / "last.pt"
    ck.atomic_save(_tiny_checkpoint(ema=False), path)
    _, _, meta = ck.load_for_inference(path, weights="ema")
    assert meta["weights"] == "raw" and not meta["has_ema"] and meta["logit_scale"] == 1.0


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_save({"format": ck.FORMAT, "value": torch.tensor([1.0])}, path)
    before = path.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointError, match="No space left") as info:
        ck.atomic_save({"format": ck.FORMAT, "value": torch.tensor([2.0])}, path)
    assert info.value.exit_code == 8
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


def test_unwritable_directory_is_a_checkpoint_error(tmp_path):
    target = tmp_path / "file"
    target.write_text("not a dir")
    with pytest.raises(CheckpointError):
        ck.atomic_save({"x": 1}, target / "last.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "content, match",
    [
        ("unsafe", "not plain tensors"),
        ("truncated", "truncated"),
        ("weights", "pretrained weights"),
        ("text", "truncated or not a PyTorch file"),
    ],
)
def test_bad_files_are_checkpoint_errors(tmp_path, content, match):
    path = tmp_path / "x.pt"
    if content == "unsafe":
        torch.save({"format": ck.FORMAT, "obj": Evil()}, path)
    elif content == "truncated":
        ck.atomic_save(_tiny_checkpoint(), path)
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "weights":
        torch.save({"state_dict": {"module.conv1.weight": torch.zeros(1)}}, path)
    else:
        path.write_text("<html>not found</html>")
    with pytest.raises(CheckpointError, match=match) as info:
        ck.load_for_inference(path)
    assert info.value.exit_code == 8


def test_a_plain_pickle_is_refused_without_running_or_warnings(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"format": ck.FORMAT, "x": _Touch(marker)}, protocol=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match="not plain tensors"):
            ck.load_for_inference(path)
    assert not marker.exists(), "unpickling ran code"
    assert not [w for w in caught if "pickle protocol" in str(w.message)], [str(w.message) for w in caught]


class _Touch:
    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ck.read_checkpoint(tmp_path / "nope.pt")


def test_rng_roundtrip_is_weights_only_safe(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    path = tmp_path / "rng.pt"
    ck.atomic_save({"rng": ck.capture_rng()}, path)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    state = torch.load(path, weights_only=True)["rng"]
    torch.rand(5), np.random.rand(5), random.random()  # move every generator on
    ck.restore_rng(state)
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_from_a_machine_with_more_gpus_restores_the_ones_here():
    """A run saved where 8 GPUs were visible resumes where fewer are: each GPU here gets its saved state."""
    torch.cuda.manual_seed_all(4)
    state = ck.capture_rng()
    expected = torch.rand(3, device="cuda")
    state["cuda"] = state["cuda"] + [state["cuda"][0]] * 8  # states for GPUs this machine lacks
    torch.rand(5, device="cuda")
    ck.restore_rng(state)
    assert torch.equal(torch.rand(3, device="cuda"), expected)


def test_pickle_module_not_used_for_loading(tmp_path, monkeypatch):
    """weights_only=True: even a checkpoint-shaped file never runs pickle's arbitrary-code path."""
    path = tmp_path / "c.pt"
    ck.atomic_save(_tiny_checkpoint(), path)
    monkeypatch.setattr(pickle, "Unpickler", None)  # the unsafe unpickler would now crash if used
    assert ck.read_checkpoint(path)["epoch"] == 3


@pytest.mark.parametrize(
    "settings, expected",
    [
        ({"select": "raw", "ema_decay": 0.999}, "raw"),  # best.pt was picked by the raw weights
        ({"select": "auto", "ema_decay": 0.999}, "ema"),
        ({"select": "auto", "ema_decay": 0.0}, "raw"),
        ({"select": "ema"}, "ema"),
    ],
)
def test_auto_weights_are_the_ones_that_selected_best_pt(tmp_path, settings, expected):
    blob = _tiny_checkpoint()
    blob["config"].update(settings)
    path = tmp_path / "best.pt"
    ck.atomic_save(blob, path)
    model, _, meta = ck.load_for_inference(path, weights="auto")
    assert meta["weights"] == expected
    source = blob["ema"] if expected == "ema" else blob["model"]
    assert torch.equal(model.conv1.weight, source["conv1.weight"])


def test_a_config_that_says_nothing_means_ema_where_present():
    assert ck.selected_weights({}) == "ema" and ck.selected_weights({"model": {}}) == "ema"
