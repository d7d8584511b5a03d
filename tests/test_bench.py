"""`medcli bench`: timing helpers, target verdicts, the README table script, and a fast smoke run of the
real command on a tiny model (the full ResNet-50 run is `make bench`, not part of the tests)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from medcli.engine import bench
from medcli.engine.bench import (
    FULL_SHAPE,
    RELEASE_BYTES,
    Timing,
    evaluate_targets,
    flatten,
    time_interleaved,
    time_it,
)
from medcli.engine.speed import cpu_has_fast_bf16
from tests.conftest import REPO, run_medcli

# ------------------------------------------------------------------------------------------------ helpers


class FakeClock:
    """bench's perf_counter, advanced by the timed functions themselves: timings exact on a busy machine
    (real sleeps of 1 ms took over 10 ms there, failing the bounds)."""

    def __init__(self, monkeypatch):
        self.now = 0.0
        monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: self.now))

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_time_it_counts_warmup_and_reports_median_min_max(monkeypatch):
    clock = FakeClock(monkeypatch)
    durations = iter([5.0, 0.03, 0.001, 0.015])  # the first call is the warm-up, never timed
    calls = []

    def fn():
        calls.append(1)
        clock.sleep(next(durations))

    t = time_it(fn, warmup=1, reps=3)
    assert len(calls) == 4 and t.reps == 3
    assert (t.min, t.median, t.max) == pytest.approx((0.001, 0.015, 0.03))


def test_time_interleaved_alternates_variants_and_times_each_apart(monkeypatch):
    clock = FakeClock(monkeypatch)
    calls = []
    sleeps = {"a": iter([9.0, 0.02, 0.04]), "b": iter([9.0, 0.001, 0.003])}

    def variant(name):
        def fn():
            calls.append(name)
            clock.sleep(next(sleeps[name]))

        return fn

    t = time_interleaved({"a": variant("a"), "b": variant("b")}, warmup=1, reps=2)
    assert calls == ["a", "b"] * 3  # warm-up round first, then A B A B
    assert t["a"].reps == t["b"].reps == 2
    assert (t["a"].min, t["a"].max, t["b"].min, t["b"].max) == pytest.approx((0.02, 0.04, 0.001, 0.003))
    with pytest.raises(ValueError):
        time_interleaved({"a": lambda: None}, reps=0)


def test_time_it_stops_early_past_max_seconds_but_times_at_least_once(monkeypatch):
    clock = FakeClock(monkeypatch)
    t = time_it(lambda: clock.sleep(0.02), warmup=0, reps=50, max_seconds=0.03)
    assert t.reps == 2  # past 0.03 s after the second
    assert time_it(lambda: clock.sleep(1.0), warmup=0, reps=50, max_seconds=0.03).reps == 1
    with pytest.raises(ValueError):
        time_it(lambda: None, reps=0)


def test_timing_rate_inverts_the_range():
    t = Timing(median=2.0, min=1.0, max=4.0, reps=3)
    assert t.rate(8.0) == {"median": 4.0, "min": 2.0, "max": 8.0}


def test_flatten_dotted_keys_and_median_range():
    rows = dict(flatten({"a": {"b": 1, "c": {"d": 2.5}}, "e": [1, 2], "f": None}))
    assert rows == {"a.b": 1, "a.c.d": 2.5, "e": [1, 2], "f": None}
    assert bench.median_range({"median": 1.0, "min": 0.5, "max": 2.0}, "{:.1f}") == "1.0 (0.5–2.0)"
    assert bench.median_range({"skipped": "x"}) == "—"
    assert bench.median_range({"median": 1.0, "min": 1.0, "max": 1.0}, "{:.1f}") == "1.0"  # one repetition


# ------------------------------------------------------------------------------------------------ targets


def _full_report(**overrides) -> dict:
    """A report shaped like a full `medcli bench` run at the targets' conditions, with chosen figures."""
    fig = overrides.get
    train_modes = {
        "fp32": {"samples_per_s": {"median": 0.1}, "speedup_vs_fp32": 1.0, "fraction_of_ceiling": 0.3,
                 "tflops": {"median": 0.05}},
        "bf16-cl": {"samples_per_s": {"median": 0.2}, "speedup_vs_fp32": fig("train_speedup", 2.0),
                    "fraction_of_ceiling": fig("train_frac", 0.7), "tflops": {"median": 0.1}},
    }  # fmt: skip
    return {
        "machine": {"native_bf16": True, "cuda": None},
        "options": {"depth": "50", "input_size": 128, "device": "cpu"},
        "sections": {
            "verify": {
                "command_s": {"median": fig("verify_s", 3.0)},
                "command_peak_rss_mb": fig("verify_rss", 900),
            },
            "fetch": {
                "fetch": {"rss_growth_mib": fig("fetch_rss", 20.0), "mib_per_s": 900.0},
                "curl": {"mib_per_s": 1000.0},
                "ratio_vs_curl": fig("fetch_ratio", 0.9),
            },
            "data": {
                "scan_shape": list(FULL_SHAPE),
                "preprocess_cold_s": fig("pre_s", 1.2),
                "synth_s_per_subject": {"total_s": 1.5},
                "cache_read_samples_per_s": fig("cache_rate", 5.0),
            },
            "train": {"default_mode": "bf16-cl", "best_mode": "bf16-cl", "modes": train_modes},
            "infer": {
                "modes": {"default": {"fraction_of_ceiling": 0.85, "tflops": {"median": 0.2}}},
                "max_abs_p_diff_bf16_vs_fp32": fig("p_diff", 0.004),
            },
            "predict": {"modes": {"default": {"speedup_vs_fp32": fig("predict_speedup", 1.9)}}},
            "ensemble": {"members": 5, "ratio_vs_passes": fig("ens_ratio", 0.95), "peak_rss_mb": 3000.0},
        },
    }


def _status(rows, fragment: str) -> str:
    (row,) = [r for r in rows if fragment in r["target"]]
    return row["status"]


def test_targets_pass_and_fail_on_the_figures():
    rows = evaluate_targets(_full_report())
    assert {r["status"] for r in rows} == {"PASS"}, [r for r in rows if r["status"] != "PASS"]
    assert {r["issue"] for r in rows} == {2, 3, 4, 5, 6}
    rows = evaluate_targets(
        _full_report(verify_rss=2000, fetch_ratio=0.5, cache_rate=0.5, train_speedup=1.2, ens_ratio=1.3)
    )
    assert _status(rows, "verify: peak RSS") == "FAIL"
    assert _status(rows, "verify a 185 MB") == "PASS"
    assert _status(rows, "80% of curl") == "FAIL"
    assert _status(rows, "cache read") == "FAIL"  # 0.5 / 0.2 samples/s = 2.5x < 10x
    assert _status(rows, "1.8x plain fp32 eager (samples/s)") == "FAIL"
    assert _status(rows, "5 folds x 8 flips <=") == "FAIL"


def test_targets_are_na_with_the_reason_off_conditions_or_not_run():
    report = _full_report()
    report["options"].update(depth="tiny", input_size=16, scan_shape=[32, 32, 24], fetch_bytes=1 << 20)
    del report["sections"]["verify"]
    rows = evaluate_targets(report)
    by = {r["target"]: r for r in rows}
    verify = next(r for t, r in by.items() if t.startswith("verify"))
    assert verify["status"] == "n/a" and verify["reached"] == "not measured"
    train = by["train step >= 60% of the ceiling (FLOP/s)"]
    assert (
        train["status"] == "n/a"
        and "not ResNet-50 at 128³" in train["note"]
        and "(there: PASS)" in train["note"]
    )
    assert "1.0 MB file" in by["fetch throughput >= 80% of curl"]["note"]
    assert all(r["status"] == "n/a" for r in rows)


def test_bf16_probabilities_are_judged_on_predicts_scan_too():
    """The forward section's random input saturates P(HGG), which hides bf16's logit error; the predict
    section's synthetic scan does not, and its difference counts."""
    report = _full_report(p_diff=0.001)
    predict = report["sections"]["predict"]["modes"]
    predict["fp32"] = {"speedup_vs_fp32": 1.0, "p_hgg": 0.80, "resolved": {"precision": "fp32"}}
    predict["default"].update(p_hgg=0.83, resolved={"precision": "bf16"})
    row = next(r for r in evaluate_targets(report) if r["target"].startswith("bf16 probabilities"))
    assert row["status"] == "FAIL" and row["reached"] == "max |Δp| 0.0300"
    assert row["note"] == "forward section's input 0.0010, predict's scan 0.0300"
    predict["default"]["p_hgg"] = 0.805
    row = next(r for r in evaluate_targets(report) if r["target"].startswith("bf16 probabilities"))
    assert row["status"] == "PASS" and row["reached"] == "max |Δp| 0.0050"
    predict["default"]["resolved"] = {"precision": "fp32"}  # an fp32 default: nothing to compare there
    row = next(r for r in evaluate_targets(report) if r["target"].startswith("bf16 probabilities"))
    assert row["reached"] == "max |Δp| 0.0010"


def test_without_native_bf16_the_speed_targets_say_why():
    report = _full_report(train_speedup=1.0)
    report["machine"]["native_bf16"] = False
    report["sections"]["infer"]["max_abs_p_diff_bf16_vs_fp32"] = None
    rows = evaluate_targets(report)
    train = next(r for r in rows if r["target"].startswith("train step >= 1.8x"))
    assert train["status"] == "FAIL" and "no native bf16" in train["note"]
    bf16 = next(r for r in rows if r["target"].startswith("bf16 probabilities"))
    assert bf16["status"] == "n/a" and bf16["reached"] == "skipped"


# ------------------------------------------------------------------------------------------------ runner


@pytest.mark.slow  # a spawned process that imports torch; seconds on an idle machine
def test_a_failing_section_is_reported_not_raised():
    figures = bench.run_section("no-such-section", {})
    assert "KeyError" in figures["error"]


@pytest.mark.slow
def test_data_verify_fetch_sections_on_small_inputs():
    """The real data, `weights verify` and fetch measurements, on small files (full size: `make bench`)."""
    opts = {
        "input_size": 16,
        "reps": 1,
        "scan_shape": (32, 32, 24),
        "verify_depth": "tiny",
        "fetch_bytes": 1 << 20,
    }
    data = bench.data_pipeline(opts)
    # Read and whole preprocessing are timed in separate passes: no order between them (a busy machine).
    assert data["preprocess_read_s"] > 0 and data["preprocess_cold_s"] > 0
    assert data["cache_read_samples_per_s"] > 0 and data["synth_s_per_subject"]["total_s"] > 0
    verify = bench.weights_verify(opts)
    assert verify["command_exit_codes"] == [0]
    assert verify["summary"].startswith("72/74 keys loaded")  # the tiny model's backbone, fc missing
    assert (
        verify["command_peak_rss_mb"] > 20
        and verify["command_s"]["median"] > verify["in_process_load_s"]["min"]
    )
    fetch = bench.weights_fetch(opts)
    assert fetch["size_bytes"] == 1 << 20 and fetch["fetch"]["mib_per_s"] > 0
    assert RELEASE_BYTES == 184_885_051


def test_predict_and_ensemble_sections_on_a_tiny_model():
    opts = {
        "depth": "tiny",
        "input_size": 16,
        "reps": 1,
        "warmup": 0,
        "scan_shape": (24, 24, 16),
        "members": 2,
    }
    pred = bench.predict_end_to_end(opts)
    modes = pred["modes"]
    assert set(modes) == {"fp32", "fp32+keep", "default"}
    assert (
        modes["fp32"]["resolved"]
        == modes["fp32+keep"]["resolved"]
        == {"precision": "fp32", "channels_last": False}
    )
    # Each pipeline ran in its own process: the plain one with glibc's malloc as it comes, the others with
    # medcli's setting (applied in that process: mallopt said yes), each with its own peak RSS.
    assert not modes["fp32"]["keeps_freed_memory"]
    if sys.platform.startswith("linux"):  # glibc's mallopt; elsewhere nothing is changed
        assert modes["fp32+keep"]["keeps_freed_memory"] and modes["default"]["keeps_freed_memory"]
    for fig in modes.values():
        assert fig["seconds"]["median"] >= sum(fig["parts_median_s"].values()) * 0.99
        assert fig["peak_rss_mb"] > 100  # torch and a model: each worker's own, not this process's
    # The plain pipeline loads as a script would (torch.load of the whole file), the others memory-map;
    # every pipeline graded the scan with the same weights (the EMA copy: "auto" in both).
    assert [m["loads_plainly"] for m in modes.values()] == [True, False, False]
    assert modes["fp32"]["p_hgg"] == modes["fp32+keep"]["p_hgg"]  # same fp32 eager forward
    assert abs(modes["default"]["p_hgg"] - modes["fp32"]["p_hgg"]) < 1e-3
    assert modes["fp32"]["speedup_vs_fp32"] == 1.0
    assert pred["peak_rss_mb"] == modes["default"]["peak_rss_mb"]  # medcli's process, not the bench's
    ens = bench.ensemble_tta(opts)
    assert ens["forward_passes"] == 2 * 8 and ens["ratio_vs_passes"] > 0


def test_train_default_row_is_the_trainers_own_setup():
    """The bench's train 'default' row times the model as the trainer builds it (CPU kernels included),
    not a plain model under the default mode's name."""
    from medcli.engine.cpu_kernels import describe
    from medcli.models import create_model

    model = create_model("tiny")
    net, resolved = bench._trainer_model(model, torch.device("cpu"), 16)
    assert net is not model and describe(model) is None
    assert describe(net) is not None and resolved.endswith(describe(net))
    assert resolved.startswith("fp32") or resolved.startswith("bf16")
    assert list(net.state_dict()) == list(model.state_dict())


def test_train_section_times_fp32_kernels_where_the_cpu_default_is_bf16(monkeypatch):
    """On a native-bf16 CPU the trainer defaults to bf16; the section then also times fp32 with medcli's
    fp32 kernels, the alternative that might beat it.  Elsewhere that row would only repeat the default."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert bench.train_candidates(cpu, "bf16-cl") == ["fp32", "fp32-cl", "bf16-cl", "default", "fp32-kernels"]
    assert bench.train_candidates(cpu, "fp32-cl") == ["fp32", "fp32-cl", "bf16-cl", "default"]
    assert bench.train_candidates(cuda, "fp16-cl") == ["fp32", "fp32-cl", "bf16-cl", "fp16-cl"]
    here = bench.train_candidates(cpu, bench.train_default_mode(cpu, 128))
    assert ("fp32-kernels" in here) == cpu_has_fast_bf16()

    # The row itself: real steps of the tiny model, as where bf16 is the default (the bf16 rows are
    # skipped on a CPU that would emulate it).
    monkeypatch.setattr(bench, "train_default_mode", lambda device, size=128: "bf16-cl")
    opts = {"depth": "tiny", "input_size": 16, "reps": 1, "warmup": 0, "ceiling_size": 8}
    modes = bench.train_step(opts)["modes"]
    assert modes["fp32-kernels"]["seconds"]["reps"] == 1 and modes["fp32-kernels"]["speedup_vs_fp32"] > 0
    from medcli.engine.cpu_kernels import describe, rewrite_for_cpu
    from medcli.models import create_model

    kernels = describe(rewrite_for_cpu(create_model("tiny"), bf16=False))  # this CPU's fp32 kernels
    assert kernels and modes["fp32-kernels"]["resolved"] == f"fp32 + channels_last_3d; {kernels}"


# ------------------------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_bench_command_smoke_json():
    """The real command, tiny model: structure and sane values of every model section and the ceiling."""
    r = run_medcli(
        "bench", "--depth", "tiny", "--input-size", "16", "--reps", "2", "--warmup", "0",
        "--ceiling-size", "8", "--sections", "ceiling,train,infer", "--json", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)  # only JSON on stdout
    assert "bench: train" in r.stderr
    ceiling = report["sections"]["ceiling"]
    assert ceiling["ceiling_tflops"] == max(ceiling[k]["tflops"] for k in ("fp32", "fp32_cl", "bf16_cl")) > 0
    assert report["options"]["ceiling_tflops"] == ceiling["ceiling_tflops"]
    native = report["machine"]["native_bf16"]
    for name in ("train", "infer"):
        s = report["sections"][name]
        assert "error" not in s and s["peak_rss_mb"] > 50
        fp32 = s["modes"]["fp32"]
        assert fp32["seconds"]["min"] <= fp32["seconds"]["median"] <= fp32["seconds"]["max"]
        assert fp32["seconds"]["reps"] == 2 and fp32["speedup_vs_fp32"] == 1.0
        # The section's ceiling: the best of the run's first probe, its own re-probe, and the probe timed in
        # turn with the section's variants (a slow moment of the earlier ones cannot flatter the model).
        probes = ("ceiling_first_tflops", "ceiling_here_tflops", "ceiling_interleaved_tflops")
        assert s["ceiling_interleaved_tflops"] > 0
        assert s["ceiling_tflops"] == max(s[k] for k in probes)
        assert s["ceiling_first_tflops"] == ceiling["ceiling_tflops"]
        assert fp32["fraction_of_ceiling"] == pytest.approx(fp32["tflops"]["median"] / s["ceiling_tflops"])
        bf16 = s["modes"]["bf16-cl" if name == "train" else "bf16-fused-cl"]
        assert ("skipped" in bf16) == (not native)
    assert report["sections"]["train"]["default_mode"] in report["sections"]["train"]["modes"]
    statuses = {t["status"] for t in report["targets"]}
    assert statuses == {"n/a"}  # a tiny model is not the targets' conditions


def test_bench_rejects_unknown_section_and_bad_values(cli):
    r = cli("bench", "--sections", "trian")
    assert r.exit_code == 2 and "did you mean 'train'" in r.output
    r = cli("bench", "--input-size", "2")
    assert r.exit_code == 2 and "--input-size 2" in r.output
    r = cli("bench", "--depth", "51")
    assert r.exit_code == 2 and "unknown model depth '51'" in r.output
    # Negative --threads was torch's traceback; a negative --ceiling-size a section "failed" with a warning.
    for flag in ("--threads", "--ceiling-size", "--warmup"):
        r = cli("bench", flag, "-1")
        assert r.exit_code == 2 and f"{flag} -1 is negative (use 0 or more)" in r.output, r.output
    # More threads than usable cores would time threads taking turns; refused before any section runs.
    import os

    cores = len(os.sched_getaffinity(0))
    r = cli("bench", "--threads", str(cores + 1), "--sections", "ceiling")
    assert r.exit_code == 2 and f"more than the {cores} cores" in r.output and "ceiling" not in r.stderr


def test_bench_list(cli):
    r = cli("bench", "--list")
    assert r.exit_code == 0
    assert [line.split()[0] for line in r.stdout.splitlines()] == list(bench.SECTIONS)


# ------------------------------------------------------------------------------------------------ README


def _script(name: str):
    """A module of scripts/ (they are not a package), loaded from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _table_script():
    return _script("bench_table")


def test_table_script_renders_and_replaces_only_between_markers(tmp_path: Path):
    table = _table_script()
    report = _full_report()
    report["machine"].update(cpu="Test CPU", cores=2, threads=2, cpu_capability="AVX2", torch="2.x")
    report["options"].update(reps=5, batch_size=2, warmup=1)
    report["sections"] = {"ceiling": {"fp32": {"tflops": 0.2, "emulated": False}}, **report["sections"]}
    report["total_s"] = 120.0
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(report))
    readme = tmp_path / "README.md"
    readme.write_text(
        "# x\n\nbefore\n<!-- bench:start (generated) -->\nold table\n<!-- bench:end -->\nafter\n"
    )
    assert table.main([str(path), "--write", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n<!-- bench:start (generated) -->\n") and text.endswith(
        "<!-- bench:end -->\nafter\n"
    )
    assert "old table" not in text
    assert "`medcli bench --reps 5 --json`" in text
    assert "| 2 | verify: peak RSS < 1.5 GB | 900 MB | **PASS** |" in text
    bad = tmp_path / "no-markers.md"
    bad.write_text("nothing here\n")
    with pytest.raises(ValueError):
        table.main([str(path), "--write", str(bad)])
    assert bad.read_text() == "nothing here\n"


def test_table_command_line_reproduces_device_and_section_subset():
    table = _table_script()
    report = _full_report()  # every section but the ceiling, on a CPU machine
    assert table.command(report) == (
        "medcli bench --sections verify,fetch,data,train,infer,predict,ensemble --json"
    )
    report["machine"]["cuda"] = "NVIDIA H200"  # a CPU-only run on a GPU machine says --device cpu
    assert table.command(report).startswith("medcli bench --device cpu --sections ")
    report["options"].update(device="cuda", reps=2)
    report["sections"] = {k: {} for k in ("ceiling", "train")}
    assert table.command(report) == "medcli bench --reps 2 --device cuda --sections ceiling,train --json"


def test_table_shows_gpu_memory_only_for_cuda_runs():
    """On the reports kept in benchmarks/: the H200 run has GPU-memory rows, the CPU runs none."""
    table = _table_script()
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    gpu = json.loads((bench_dir / "h200-resnet50-128.json").read_text())
    rows = table.figure_rows(gpu)
    expected = f"{gpu['sections']['train']['cuda_peak_mb']:.0f} MB"
    assert rows["train step: peak GPU memory"] == expected
    assert rows["ensemble: peak GPU memory"].endswith(" MB")
    cpu = json.loads((bench_dir / "cpu-resnet50-128-merged.json").read_text())
    assert not [k for k in table.figure_rows(cpu) if "GPU memory" in k]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this platform")
def test_cpu_info_counts_the_cores_this_process_may_use():
    # A run pinned with taskset to 1 of N cores is a 1-core measurement, whatever the machine has.
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(saved)})
        info = bench.cpu_info()
    finally:
        os.sched_setaffinity(0, saved)
    assert info["cores"] == 1
    assert info["cpu_count"] == os.cpu_count()


def test_table_columns_name_the_cpu_its_cores_and_native_bf16():
    table = _table_script()
    report = _full_report()
    report["machine"].update(cpu="Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.00GHz", cores=2, native_bf16=True)
    assert table.label(report) == "Intel Xeon Platinum 8480+ (bf16), 2 cores, 128³"
    report["machine"].update(cpu="AMD EPYC 7B13", cores=16, native_bf16=False)
    assert table.label(report) == "AMD EPYC 7B13, 16 cores, 128³"
    report["machine"]["cuda"] = "NVIDIA H200"
    report["options"]["device"] = "cuda"
    assert table.label(report) == "NVIDIA H200, 128³"


def test_profile_forward_script_accounts_for_every_flop_by_stage():
    script = _script("profile_forward")
    from torch.utils.flop_counter import FlopCounterMode

    from medcli.models import create_model

    # FLOPs are the declared model's, whatever kernels run: fp32 (Winograd) and bf16 (fused oneDNN ops, which
    # the counter does not see; their stages would read 0 FLOPs) alike.
    with FlopCounterMode(display=False) as counter:
        create_model("tiny")(torch.randn(1, 1, 16, 16, 16))
    total = counter.get_total_flops()
    for precision in ("fp32", "bf16"):
        r = script.profile("tiny", 16, precision, reps=1, warmup=1)
        assert r["precision"] == precision
        staged = sum(row["gflop"] for row in r["stages"]) * 1e9
        assert 0.99 * total <= staged <= total  # the stages hold all but the classifier head
        assert {"conv1", "layer1", "layer4"} <= {row["stage"] for row in r["stages"]}
        assert all(row["ms"] > 0 for row in r["stages"] if row["gflop"] > 0) and r["total_ms"] > 0


@pytest.mark.parametrize("r", [2, 4])
def test_dilated_conv_variants_compute_the_dilated_conv(r):
    """The candidates scripts/bench_dilated_conv.py times are the same function (values and gradients)."""
    script = _script("bench_dilated_conv")
    torch.manual_seed(0)
    x = torch.randn(2, 6, 8, 8, 8).contiguous(memory_format=torch.channels_last_3d)
    w, b = torch.randn(5, 6, 3, 3, 3), torch.randn(5)
    ref_x, ref_w = x.clone().requires_grad_(), w.clone().requires_grad_()
    ref = script.dilated(ref_x, ref_w, b, r)
    ref.square().sum().backward()
    for name, conv in script.VARIANTS.items():
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = conv(xi, wi, b, r)
        y.square().sum().backward()
        loose = {"rtol": 1e-4, "atol": 1e-4}  # gradients: sums of many more products
        for got, want, tol in ((y, ref, {}), (xi.grad, ref_x.grad, loose), (wi.grad, ref_w.grad, loose)):
            got, want = got.detach(), want.detach()
            if name == "winograd":  # float32 rounding of ~1e-5 of the tensor's scale, not of each value
                assert float((got - want).norm() / want.norm()) < 2e-5, name
            else:
                torch.testing.assert_close(got, want, msg=name, **tol)
    timed = script.time_variants(8, r, size=8, reps=1)
    assert set(timed) == set(script.VARIANTS) and all(v["seconds"] > 0 for v in timed.values())
