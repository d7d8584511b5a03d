"""``load_pretrained``: real weights files in MedicalNet's released layout (generated), real models.

The ResNet-50 fixture is a ~185 MB legacy-format file, written once per session (helpers_models).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from collections import OrderedDict

import pytest
import torch
from helpers_models import medicalnet_file

from medcli.errors import IncompleteLoadError, WeightsError
from medcli.models import create_model, detect_architecture, load_pretrained
from medcli.models.pretrained import LEGACY_MAGIC, ZIP_MAGIC, inspect_file
from medcli.models.synthetic import medicalnet_state_dict, write_medicalnet_checkpoint


def _file_state(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def r50_file(tmp_path_factory):
    return medicalnet_file(tmp_path_factory, 50)


@pytest.fixture(scope="module")
def r50_model():
    return create_model(50, num_classes=2)


@pytest.fixture(scope="module")
def r50_report(r50_file, r50_model):
    return load_pretrained(r50_model, r50_file)


@pytest.fixture
def tiny_file(tmp_path_factory):
    return medicalnet_file(tmp_path_factory, "tiny")


# ----------------------------------------------------------------------------- the released layout
def test_fixture_has_the_released_layout(r50_file):
    """Guard the fixture: legacy serialization, {'state_dict': OrderedDict}, module. prefix, counters."""
    assert r50_file.read_bytes()[:14] == LEGACY_MAGIC
    obj = torch.load(r50_file, map_location="cpu", weights_only=True)
    assert list(obj) == ["state_dict"] and isinstance(obj["state_dict"], OrderedDict)
    state = obj["state_dict"]
    assert len(state) == 318 and all(k.startswith("module.") for k in state)
    counters = [v for k, v in state.items() if k.endswith("num_batches_tracked")]
    assert len(counters) == 53 and all(v.dtype == torch.int64 and v.dim() == 0 for v in counters)
    assert not any(k.startswith(("module.fc", "module.conv_seg")) for k in state)
    assert 180e6 < r50_file.stat().st_size < 190e6  # the real file: 184,885,051 bytes


def test_resnet50_released_layout_loads_318_of_320(r50_file, r50_model, r50_report):
    report = r50_report
    assert (len(report.loaded), len(report.model_keys), report.file_entries) == (318, 320, 318)
    assert report.missing == ["fc.weight", "fc.bias"]
    assert report.unexpected == [] and report.mismatched == [] and report.ignored == []
    assert report.params_total == report.params_trainable == 46_159_170
    assert report.summary_line() == (
        "318/320 keys loaded · missing 2 (fc.weight, fc.bias) · unexpected 0 · shape mismatches 0 · "
        "46.16M params"
    )
    assert report.ok
    assert (report.format, report.container, report.prefix_stripped) == (
        "legacy pickle",
        "state_dict",
        "module.",
    )
    assert report.detected_arch == "resnet50" and report.model_arch == "resnet50"
    assert report.size == r50_file.stat().st_size
    assert report.sha256 == hashlib.sha256(r50_file.read_bytes()).hexdigest()
    assert report.release is None and report.to_dict()["release_label"] == "unknown release"

    # every loaded tensor (num_batches_tracked included) now equals the file's
    model_state = r50_model.state_dict()
    for key, tensor in _file_state(r50_file).items():
        assert torch.equal(model_state[key.removeprefix("module.")], tensor), key


@pytest.mark.parametrize(("depth", "entries"), [(18, 102), (10, 72)])
def test_basic_block_depths_load_completely(tmp_path_factory, depth, entries):
    path = medicalnet_file(tmp_path_factory, depth)
    model = create_model(depth)
    report = load_pretrained(model, path)
    assert (len(report.loaded), len(report.model_keys)) == (entries, entries + 2)
    assert report.missing == ["fc.weight", "fc.bias"] and not report.unexpected and not report.mismatched
    assert report.ok and report.detected_arch == f"resnet{depth}"
    assert f"{entries}/{entries + 2} keys loaded" in report.summary_line()
    has_downsample = any("downsample" in k for k in report.loaded)
    assert has_downsample == (depth == 10)  # shortcut B for 10, A (no keys) for 18
    state = model.state_dict()
    assert all(torch.equal(state[k.removeprefix("module.")], v) for k, v in _file_state(path).items())


def test_to_dict_is_json_and_by_layer_adds_up(r50_report):
    report = r50_report
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is True and data["counts"]["loaded"] == 318 and data["counts"]["model_entries"] == 320
    assert data["summary"] == report.summary_line()
    rows = dict(report.by_layer())
    assert list(rows) == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    assert sum(r["loaded"] for r in rows.values()) == 318
    assert rows["fc"] == {"loaded": 0, "missing": 2, "unexpected": 0, "mismatched": 0, "ignored": 0}
    assert rows["stem"]["loaded"] == 6  # conv1.weight + bn1's five entries
    assert report.keys_by_layer("missing") == {"fc": ["fc.weight", "fc.bias"]}


# --------------------------------------------------------------------------------- layout variants
@pytest.mark.parametrize(
    ("legacy", "container", "prefix"),
    [
        (False, "state_dict", "module."),
        (True, "model", ""),
        (False, "direct", ""),
        (True, "direct", "module."),
    ],
)
def test_formats_containers_and_prefixes(tmp_path, legacy, container, prefix):
    path = write_medicalnet_checkpoint(
        tmp_path / "w.pth", depth="tiny", legacy=legacy, container=container, prefix=prefix
    )
    assert path.read_bytes()[:4] == (ZIP_MAGIC if not legacy else LEGACY_MAGIC[:4])
    model = create_model("tiny")
    report = load_pretrained(model, path)
    assert report.ok and report.missing == ["fc.weight", "fc.bias"]
    assert report.format == ("legacy pickle" if legacy else "zip")
    assert report.container == container and report.prefix_stripped == prefix
    expected = medicalnet_state_dict("tiny", prefix="")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())


def test_prefix_is_stripped_only_at_the_start(tmp_path):
    state = medicalnet_state_dict("tiny", prefix="module.")
    state["module.layer1.module.extra"] = torch.zeros(3)
    state["head.module.x"] = torch.zeros(1)
    torch.save(state, tmp_path / "w.pth")
    report = load_pretrained(create_model("tiny"), tmp_path / "w.pth")
    assert report.unexpected == ["layer1.module.extra", "head.module.x"]
    assert not report.ok and len(report.loaded) == len(report.model_keys) - 2


def test_conv_seg_and_a_foreign_head_are_ignored_a_matching_head_loads(tmp_path):
    state = medicalnet_state_dict("tiny", prefix="module.")
    state["module.conv_seg.0.weight"] = torch.zeros(32, 64, 2, 2, 2)
    state["module.fc.weight"] = torch.zeros(3, 64)  # a 3-class head from a fine-tuned checkpoint
    state["module.fc.bias"] = torch.zeros(3)
    torch.save({"state_dict": state}, tmp_path / "seg.pth")
    report = load_pretrained(create_model("tiny", num_classes=2), tmp_path / "seg.pth")
    assert report.ignored == ["conv_seg.0.weight", "fc.weight", "fc.bias"]
    assert report.ok and report.missing == ["fc.weight", "fc.bias"] and not report.mismatched

    # a medcli checkpoint with the same head: the head loads too, nothing is missing
    source = create_model("tiny", num_classes=2)
    torch.save(
        {"format": "medcli-checkpoint/1", "model": source.state_dict(), "epoch": 3}, tmp_path / "ck.pt"
    )
    target = create_model("tiny", num_classes=2)
    report = load_pretrained(target, tmp_path / "ck.pt")
    assert report.container == "model" and report.missing == [] and report.ok
    assert torch.equal(target.fc.weight, source.fc.weight)

    # a linear head's fc.bias means nothing to a cosine head: ignored, not unexpected
    cosine = create_model("tiny", num_classes=2, head="cosine")
    report = load_pretrained(cosine, tmp_path / "ck.pt")
    assert report.ignored == ["fc.bias"] and not report.unexpected and report.ok
    assert torch.equal(cosine.fc.weight, source.fc.weight)


def test_a_data_parallel_wrapped_model_loads_into_its_module(tiny_file):
    # module.* keys; with one CUDA GPU, DataParallel also moves the model onto it
    wrapped = torch.nn.DataParallel(create_model("tiny"))
    report = load_pretrained(wrapped, tiny_file)
    assert report.ok and report.missing == ["fc.weight", "fc.bias"]
    expected = _file_state(tiny_file)["module.conv1.weight"]
    assert torch.equal(wrapped.module.conv1.weight.cpu(), expected)


def test_missing_num_batches_tracked_is_counted_but_harmless(tmp_path):
    state = {k: v for k, v in medicalnet_state_dict("tiny").items() if not k.endswith("num_batches_tracked")}
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    model = create_model("tiny")
    n_counters = sum(k.endswith("num_batches_tracked") for k in model.state_dict())
    report = load_pretrained(model, tmp_path / "w.pth")
    assert len(report.missing) == 2 + n_counters  # counted on the dict, not hidden by load_state_dict
    assert report.ok and any("num_batches_tracked" in w for w in report.warnings)


def test_shape_mismatch_is_reported_and_strict_refuses_before_loading(tmp_path):
    state = medicalnet_state_dict("tiny")
    state["module.layer4.0.conv2.weight"] = torch.zeros(64, 64, 1, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    model = create_model("tiny")
    before = _snapshot(model)
    with pytest.raises(IncompleteLoadError, match="shape mismatches 1 \\(layer4.0.conv2.weight\\)"):
        load_pretrained(model, tmp_path / "w.pth", strict=True)
    assert _unchanged(model, before)

    report = load_pretrained(model, tmp_path / "w.pth")
    assert report.mismatched == [("layer4.0.conv2.weight", [64, 64, 1, 1, 1], [64, 64, 3, 3, 3])]
    assert not report.ok and report.missing == ["fc.weight", "fc.bias"]
    assert torch.equal(model.layer4[0].conv2.weight, before["layer4.0.conv2.weight"])  # left as it was


def test_one_channel_conv1_is_adapted_to_four_channels(tiny_file):
    model = create_model("tiny", in_channels=4)
    report = load_pretrained(model, tiny_file)
    assert report.ok and "conv1.weight" in report.loaded
    assert report.adapted == ["conv1.weight adapted 1→4 channels (repeat, ×1/4)"]
    kernel = _file_state(tiny_file)["module.conv1.weight"]  # [8, 1, 7, 7, 7]
    assert torch.allclose(model.conv1.weight, kernel.repeat(1, 4, 1, 1, 1) / 4)
    # the adapted stem responds to a 4-channel copy of a volume as the original did to the volume
    original = create_model("tiny", in_channels=1)
    load_pretrained(original, tiny_file)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.conv1(x.repeat(1, 4, 1, 1, 1)), original.conv1(x), atol=1e-5)


def test_a_four_channel_file_into_a_one_channel_model_says_which_option(tmp_path):
    write_medicalnet_checkpoint(tmp_path / "w4.pth", "tiny", in_channels=4)
    model = create_model("tiny", in_channels=1)
    report = load_pretrained(model, tmp_path / "w4.pth")
    assert report.mismatched == [("conv1.weight", [8, 4, 7, 7, 7], [8, 1, 7, 7, 7])] and not report.ok
    with pytest.raises(IncompleteLoadError, match="conv1 takes 4 input channels; use --in-channels 4"):
        load_pretrained(model, tmp_path / "w4.pth", strict=True)


# ----------------------------------------------------------------------------------- refusals
def test_missing_file_warns_and_keeps_random_init(tmp_path):
    model = create_model("tiny")
    before = _snapshot(model)
    report = load_pretrained(model, tmp_path / "nope.pth")
    assert not report.exists and not report.ok and report.loaded == []
    assert "not found" in report.warnings[0] and "medcli weights fetch" in report.warnings[0]
    assert report.summary_line().startswith("weights file not found")
    assert _unchanged(model, before)
    with pytest.raises(WeightsError, match="not found.*nope.pth.*medcli weights fetch"):
        load_pretrained(model, tmp_path / "nope.pth", require=True)


def _truncated(path, tmp_path, keep: float):
    data = path.read_bytes()
    out = tmp_path / f"truncated-{path.name}"
    out.write_bytes(data[: int(len(data) * keep)])
    return out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"\n  <!DOCTYPE html><html><body>Sign in to Google Drive</body></html>", "web page \\(HTML\\)"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 1\n", "Git LFS pointer"),
        (b"\x13\x37garbage" + os.urandom(4096), "not a PyTorch weights file"),
        (b'{"error": "Repository not found"}', "JSON"),
    ],
    ids=["empty", "html", "lfs-pointer", "random-bytes", "json"],
)
def test_unusable_files_are_weights_errors_that_say_what_to_do(tmp_path, content, message):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    model = create_model("tiny")
    before = _snapshot(model)
    with pytest.raises(WeightsError, match=message) as info:
        load_pretrained(model, path)
    assert not isinstance(info.value, IncompleteLoadError)
    assert "medcli weights fetch" in str(info.value)
    assert _unchanged(model, before)


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "zip"])
@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_files(tiny_file, tmp_path, legacy, keep):
    source = tiny_file if legacy else write_medicalnet_checkpoint(tmp_path / "z.pth", "tiny", legacy=False)
    with pytest.raises(WeightsError, match="truncated or corrupt.*medcli weights fetch"):
        load_pretrained(create_model("tiny"), _truncated(source, tmp_path, keep))


def test_a_release_archive_is_not_a_checkpoint(tmp_path):
    with zipfile.ZipFile(tmp_path / "MedicalNet_pytorch_files.zip", "w") as archive:
        archive.writestr("MedicalNet_pytorch_files/pretrain/resnet_50_23dataset.pth", b"x" * 100)
    with pytest.raises(WeightsError, match="zip archive but not a PyTorch checkpoint.*resnet_50_23dataset"):
        load_pretrained(create_model("tiny"), tmp_path / "MedicalNet_pytorch_files.zip")


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


@pytest.mark.parametrize("how", ["torch-legacy", "torch-zip", "plain-pickle"])
def test_malicious_pickle_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    payload = {"state_dict": {"conv1.weight": torch.zeros(1), "evil": _Evil(marker)}}
    path = tmp_path / "evil.pth"
    if how == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=4))
    else:
        torch.save(payload, path, _use_new_zipfile_serialization=how == "torch-zip")
    with pytest.raises(WeightsError) as info:
        load_pretrained(create_model("tiny"), path)
    assert not marker.exists(), "unpickling ran code"
    text = str(info.value)
    if how == "plain-pickle":  # refused from its first bytes, before any unpickling
        assert "plain Python pickle" in text
    else:
        assert "Python objects other than tensors" in text and "weights_only=True" in text


def test_nan_weights_are_refused(tmp_path):
    state = medicalnet_state_dict("tiny")
    state["module.layer2.0.conv1.weight"][0, 0, 0, 0, 0] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="NaN/Inf.*layer2.0.conv1.weight"):
        load_pretrained(create_model("tiny"), tmp_path / "w.pth")


def test_wrong_depth_names_the_right_one_and_leaves_the_model_alone(tmp_path_factory, r50_model):
    r18 = medicalnet_file(tmp_path_factory, 18)
    before = _snapshot(r50_model)
    with pytest.raises(IncompleteLoadError, match="ResNet-18 MedicalNet file.*ResNet-50.*use --depth 18"):
        load_pretrained(r50_model, r18)
    assert _unchanged(r50_model, before)


def test_wrong_depth_same_stage_layout(tmp_path_factory):
    """ResNet-10 and tiny share block type, stages and key names; only widths differ: still refused."""
    r10 = medicalnet_file(tmp_path_factory, 10)
    with pytest.raises(IncompleteLoadError, match="use --depth 10"):
        load_pretrained(create_model("tiny"), r10)


def test_almost_nothing_matching_is_an_error_not_a_random_init(tmp_path):
    state = {f"encoder.{k}": v for k, v in medicalnet_state_dict("tiny", prefix="").items()}
    torch.save(state, tmp_path / "w.pth")
    model = create_model("tiny")
    before = _snapshot(model)
    with pytest.raises(IncompleteLoadError, match="matches almost nothing.*0/"):
        load_pretrained(model, tmp_path / "w.pth")
    assert _unchanged(model, before)


def test_a_file_without_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "note": "x"}, tmp_path / "w.pth")
    with pytest.raises(WeightsError, match="holds no state dict \\(found epoch, note\\)"):
        load_pretrained(create_model("tiny"), tmp_path / "w.pth")


# ------------------------------------------------------------------------------ architecture, release
@pytest.mark.parametrize("depth", [10, 18, 34, 50, 101, 152, 200, "tiny"])
def test_detect_architecture_from_keys(depth):
    with torch.device("meta"):
        state = create_model(depth, in_channels=3).state_dict()
    detected = detect_architecture(state)
    assert detected.name == (f"resnet{depth}" if depth != "tiny" else "tiny")
    assert detected.in_channels == 3
    assert detected.shortcut == ("A" if depth in (18, 34) else "B")


def test_known_release_is_recognised_by_sha256(tiny_file, tmp_path, monkeypatch):
    sha = hashlib.sha256(tiny_file.read_bytes()).hexdigest()
    manifest = {
        "format": "medcli-weights-manifest/1",
        "default": "tiny_test",
        "weights": [
            {"name": "tiny_test", "depth": 10, "datasets": 1, "file": "tiny.pth",
             "size": tiny_file.stat().st_size, "sha256": sha, "urls": ["http://127.0.0.1/tiny.pth"]},
            {"name": "other", "depth": 10, "datasets": 1, "file": "other.pth", "size": 12345,
             "sha256": "0" * 64, "urls": ["http://127.0.0.1/other.pth"]},
        ],
    }  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("MEDCLI_WEIGHTS_MANIFEST", str(tmp_path / "manifest.json"))
    report = load_pretrained(create_model("tiny"), tiny_file)
    assert report.release["name"] == "tiny_test"
    assert report.to_dict()["release_label"] == "tiny_test (tiny.pth)"
    assert inspect_file(tiny_file)["release"]["name"] == "tiny_test"

    # same size as a known release, other hash: a corrupt copy, said so
    manifest["weights"][0]["sha256"] = "f" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    report = load_pretrained(create_model("tiny"), tiny_file)
    assert report.release is None and any("different SHA-256" in w for w in report.warnings)


def test_inspect_file_without_a_model(r50_file):
    info = inspect_file(r50_file)
    assert info["entries"] == 318 and info["detected_arch"] == "resnet50" and info["in_channels"] == 1
    assert info["format"] == "legacy pickle" and info["prefix_stripped"] == "module."


@pytest.mark.slow
def test_verifying_resnet50_is_memory_lean(r50_file):
    """Peak RSS of a process that builds ResNet-50 and loads the 185 MB legacy file (target < 1.5 GB).

    Counted above the process's RSS once torch is imported: a CUDA build of torch alone takes ~0.5 GB
    more than the CPU build, which is not the loader's doing (on a CPU build the import is ~0.2 GB)."""
    import subprocess
    import sys

    code = (
        "import resource, sys\n"
        "from medcli.models import create_model, load_pretrained\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "report = load_pretrained(create_model(50), sys.argv[1])\n"
        "assert report.ok\n"
        "print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(r50_file)], capture_output=True, text=True, check=True
    )
    base_mib, peak_mib = (int(v) / 1024 for v in done.stdout.split())
    assert peak_mib - base_mib < 1536 - 256, f"peak RSS {peak_mib:.0f} MiB, {base_mib:.0f} of it the imports"
