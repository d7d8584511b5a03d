"""`--device`: one resolver for train, eval, predict and bench (medcli.engine.devices)."""

from __future__ import annotations

import pytest
import torch

from medcli.engine.devices import select_device
from medcli.errors import DeviceError, UsageError

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="asks for CUDA where there is none")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("spec", ["cpu", " CPU ", "cpu:0"])
def test_cpu_spellings(spec):
    assert select_device(spec) == torch.device("cpu")


def test_auto_is_the_gpu_where_there_is_one():
    want = (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )
    assert select_device("auto") == want
    assert select_device("") == want


@pytest.mark.parametrize(
    ("spec", "says"), [("gpu", "not a device"), ("mps", "medcli runs on CPUs and CUDA GPUs only")]
)
def test_unknown_or_unsupported_devices_are_usage_errors(spec, says):
    with pytest.raises(UsageError) as e:
        select_device(spec)
    assert f"--device {spec}: {says}" in str(e.value)
    assert "cuda:N" in e.value.hint


@needs_no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_a_gpu_names_the_request_and_the_build(spec):
    with pytest.raises(DeviceError) as e:
        select_device(spec)
    assert str(e.value).startswith(
        f"--device {spec} needs a CUDA GPU, but none is visible (torch {torch.__version__}"
    )
    assert e.value.exit_code == 9
    with pytest.raises(DeviceError, match="^--gpu needs a CUDA GPU"):
        select_device(spec, asked="--gpu")


@needs_cuda
def test_a_gpu_index_beyond_those_visible_is_refused():
    count = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"only {count} GPU"):
        select_device(f"cuda:{count}")


@needs_cuda
def test_the_chosen_gpu_becomes_current():
    last = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    try:
        torch.cuda.set_device(0)
        # Only checked (the --multi_gpu launcher, bench's parent process): the current GPU stays.
        assert select_device(f"cuda:{last}", make_current=False) == torch.device("cuda", last)
        assert torch.cuda.current_device() == 0
        assert select_device(f"cuda:{last}") == torch.device("cuda", last)
        assert torch.cuda.current_device() == last
        assert select_device("cuda") == torch.device("cuda", last)  # plain `cuda`: the current one
    finally:
        torch.cuda.set_device(before)


@needs_no_cuda
def test_predict_and_bench_refuse_cuda_here_before_any_work(cli, tmp_path):
    """The commands' own flags go through the same resolver: same message, exit 9 (and 2 for a typo)."""
    from helpers_predict import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "best.pt", steps=1)
    scan = tmp_path / "scan.nii.gz"
    scan.write_bytes(b"")  # never read: the device is checked first
    r = cli("predict", scan, "--model", ckpt, "--device", "cuda:1")
    assert r.exit_code == 9, r.output
    assert "--device cuda:1 needs a CUDA GPU" in r.stderr

    r = cli("bench", "--device", "cuda", "--sections", "ceiling")
    assert r.exit_code == 9 and "--device cuda needs a CUDA GPU" in r.stderr
    r = cli("bench", "--device", "gpu", "--sections", "ceiling")
    assert r.exit_code == 2 and "--device gpu: not a device" in r.stderr
