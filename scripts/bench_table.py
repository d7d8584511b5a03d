#!/usr/bin/env python3
"""Render `medcli bench --json` reports as the README's "Speed and memory" section.

    medcli bench --json > bench-out/cpu.json             # on each machine
    python scripts/bench_table.py bench-out/cpu.json bench-out/gpu.json             # print the markdown
    python scripts/bench_table.py bench-out/cpu.json bench-out/gpu.json --write README.md

With ``--write`` only the text between ``<!-- bench:start ... -->`` and ``<!-- bench:end -->`` is replaced
(atomically).  Targets are re-evaluated from the figures with ``medcli.engine.bench.evaluate_targets``, so
a fix to a target's wording or logic does not need a new run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medcli.atomic import atomic_write_text
from medcli.engine.bench import SECTIONS, evaluate_targets, figure, median_range

START, END = "<!-- bench:start", "<!-- bench:end -->"

INTRO = """\
`medcli bench` measures, in one run on the machine at hand: the compute ceiling (best FLOP/s of a
large dense Conv3d), the train step and the single-scan forward pass (fp32 eager baseline vs medcli's
default path; FLOPs counted with `torch.utils.flop_counter`), `predict` end to end, a 5-fold x 8-flip
ensemble, preprocessing / cache reads / synth, `weights verify` and `weights fetch`, each section in its
own process so that its peak RSS is its own. Each figure is the median of the timed repetitions after
warm-up, min–max in brackets; ratios are taken within one run, the compared variants timed in turn. A
target measured under other conditions than its own (a smaller input, say) is `n/a`, with the verdict it
got there in the notes. Regenerate:
`medcli bench --json > bench-out/cpu.json` (`make bench` prints the tables instead), then
`python scripts/bench_table.py bench-out/*.json --write README.md`.
"""


def short_cpu(name: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8480+ CPU @ 2.0GHz' -> 'Intel Xeon Platinum 8480+'."""
    name = name.split("@")[0]
    for junk in ("(R)", "(TM)", "(tm)", " CPU", " Processor"):
        name = name.replace(junk, "")
    return " ".join(name.split()[:4]) or "CPU"


def label(report: dict) -> str:
    """A column's name: the device, the cores the run could use, native bf16, the input size."""
    m = report["machine"]
    device = report["options"].get("device", "cpu")
    size = report["options"].get("input_size", 128)
    if device.startswith("cuda") and m.get("cuda"):
        return f"{m['cuda']}, {size}³"
    bf16 = " (bf16)" if m.get("native_bf16") else ""
    return f"{short_cpu(m.get('cpu', ''))}{bf16}, {m['cores']} cores, {size}³"


def command(report: dict) -> str:
    """The command line that reproduces ``report`` (its options, defaults left out)."""
    o = report["options"]
    parts = ["medcli bench"]
    defaults = {"depth": "50", "input_size": 128, "batch_size": 2, "reps": 3, "warmup": 1}
    for key, flag in (
        ("depth", "--depth"),
        ("input_size", "--input-size"),
        ("batch_size", "--batch-size"),
        ("reps", "--reps"),
        ("warmup", "--warmup"),
    ):
        if key in o and str(o[key]) != str(defaults[key]):
            parts.append(f"{flag} {o[key]}")
    if o.get("threads"):
        parts.append(f"--threads {o['threads']}")
    # A CPU-only run on a machine with a GPU, or a CUDA run, says so; "auto" on a CPU machine needs no flag.
    if o.get("device") and (o["device"] != "cpu" or report["machine"].get("cuda")):
        parts.append(f"--device {o['device']}")
    ran = list(report.get("sections", {}))
    if ran and set(ran) != set(SECTIONS):
        parts.append(f"--sections {','.join(ran)}")
    return " ".join(parts) + " --json"


def figure_rows(report: dict) -> dict[str, str]:
    """Figure name → rendered value (median (min–max)) for one report; a section whose figures are
    incomplete (an older report, a failed section) is left out rather than stopping the table."""
    rows: dict[str, str] = {}
    for render_section in _SECTION_ROWS:
        try:
            rows.update(render_section(report))
        except (KeyError, TypeError):
            continue
    return rows


def _ceiling_rows(report: dict) -> dict[str, str]:
    rows: dict[str, str] = {}
    c = figure(report, "ceiling")
    if c and "error" not in c:
        for k in ("bf16_cl", "fp16_cl", "fp32_cl", "fp32"):
            if k in c:
                note = " (emulated, 8³)" if c[k].get("emulated") else ""
                rows[f"ceiling: dense Conv3d {k}, TFLOP/s (best)"] = f"{c[k]['tflops']:.3g}{note}"
    return rows


def _model_rows(report: dict) -> dict[str, str]:
    rows: dict[str, str] = {}
    for section, what in (("train", "train step"), ("infer", "forward, 1 scan")):
        s = figure(report, section)
        if not s or "error" in s:
            continue
        for mode, fig in s["modes"].items():
            name = f"{what} {s['model']} {s['input_size']}³ [{mode}]"
            if "skipped" in fig:
                rows[name] = "skipped: no native bf16"
                continue
            frac = fig.get("fraction_of_ceiling")
            rows[name] = (
                f"{median_range(fig['samples_per_s'])} samples/s · {fig['tflops']['median']:.3g} TFLOP/s"
                + (f" ({frac:.0%} of ceiling)" if frac is not None else "")
                + f" · {fig['speedup_vs_fp32']:.2f}x"
            )
        rows[f"{what}: peak RSS"] = f"{s['peak_rss_mb']:.0f} MB"
        if s.get("cuda_peak_mb") is not None:
            rows[f"{what}: peak GPU memory"] = f"{s['cuda_peak_mb']:.0f} MB"
    return rows


def _predict_rows(report: dict) -> dict[str, str]:
    rows: dict[str, str] = {}
    p = figure(report, "predict")
    if p and "error" not in p:
        for mode, fig in p["modes"].items():
            parts = fig["parts_median_s"]
            rows[f"predict end to end, full-size t1ce [{mode}], s"] = (
                f"{median_range(fig['seconds'])} "
                f"(load {parts['load']:.2f}, preprocess+forward {parts['predict']:.2f})"
                f" · {fig['speedup_vs_fp32']:.2f}x"
            )
        # Each pipeline's own process (reports before that held them all in one: the section's).
        rss = p["modes"].get("default", {}).get("peak_rss_mb", p["peak_rss_mb"])
        rows["predict: peak RSS"] = f"{rss:.0f} MB"
    e = figure(report, "ensemble")
    if e and "error" not in e:
        rows[f"ensemble {e['members']} folds x {e['flips']} flips, s"] = (
            f"{median_range(e['ensemble_tta_s'])} = "
            f"{e['ratio_vs_passes']:.2f}x {e['forward_passes']} x one pass "
            f"({median_range(e['one_forward_s'])} s)"
        )
        rows["ensemble: peak RSS"] = f"{e['peak_rss_mb']:.0f} MB"
        if e.get("cuda_peak_mb") is not None:
            rows["ensemble: peak GPU memory"] = f"{e['cuda_peak_mb']:.0f} MB"
    return rows


def _data_rows(report: dict) -> dict[str, str]:
    rows: dict[str, str] = {}
    d = figure(report, "data")
    if d and "error" not in d:
        rows["preprocess, cold, 4 modalities, 1 core, s"] = f"{d['preprocess_cold_s']:.2f}"
        rows["cache read, samples/s (1 process)"] = f"{d['cache_read_samples_per_s']:.1f}"
        rows["synth, full-size subject, s"] = f"{d['synth_s_per_subject']['total_s']:.2f}"
        rows["data: peak RSS"] = f"{d['peak_rss_mb']:.0f} MB"
    return rows


def _weights_rows(report: dict) -> dict[str, str]:
    rows: dict[str, str] = {}
    v = figure(report, "verify")
    if v and "error" not in v:
        rows[f"weights verify, {v['file_mb']:.0f} MB file, s"] = (
            f"{median_range(v['command_s'])} (in-process load {v['in_process_load_s']['median']:.2f})"
        )
        rows["weights verify: peak RSS"] = f"{v['command_peak_rss_mb']:.0f} MB"
    f = figure(report, "fetch")
    if f and "error" not in f:
        curl = f" vs curl {f['curl']['mib_per_s']:.0f}" if f.get("curl") else ""
        rows["weights fetch over loopback, MiB/s"] = f"{f['fetch']['mib_per_s']:.0f}{curl}"
        rows["weights fetch: RSS growth"] = f"{f['fetch']['rss_growth_mib']:.0f} MiB"
    return rows


_SECTION_ROWS = (_ceiling_rows, _model_rows, _predict_rows, _data_rows, _weights_rows)


def render(reports: list[dict], notes: list[str] | None = None) -> str:
    labels = [label(r) for r in reports]
    out: list[str] = []
    out.append(INTRO)
    for lab, r in zip(labels, reports, strict=True):
        m = r["machine"]
        out.append(
            f"- **{lab}**: {m['cpu']}, {m['cores']} cores ({m['threads']} torch threads), "
            f"{m['cpu_capability']}, native CPU bf16: {'yes' if m['native_bf16'] else 'no'}"
            + (f", GPU {m['cuda']}" if m.get("cuda") else "")
            + f", torch {m['torch']}; load average at start {m.get('load_avg')}; {r.get('started', '')}; "
            + f"`{command(r)}` ({r['total_s'] / 60:.1f} min)"
        )
    out.extend(f"- {note}" for note in notes or [])
    out.append("")
    # Targets: one row per target, one reached/status pair per machine.
    out.append(
        "| issue | target | " + " | ".join(f"{lab}: reached | status" for lab in labels) + " | notes |"
    )
    out.append("|---|---|" + "---|---|" * len(labels) + "---|")
    per_machine = [evaluate_targets(r) for r in reports]
    by_key = [{t.get("key", t["target"]): t for t in targets} for targets in per_machine]
    for row in per_machine[0]:
        cells, notes = [], []
        for lab, targets in zip(labels, by_key, strict=True):
            t = targets.get(row.get("key", row["target"]), {"reached": "—", "status": "—", "note": ""})
            status = {"PASS": "**PASS**", "FAIL": "**FAIL**"}.get(t["status"], t["status"])
            cells += [t["reached"], status]
            if t["note"]:
                notes.append(f"{lab}: {t['note']}" if len(labels) > 1 else t["note"])
        out.append(f"| {row['issue']} | {row['target']} | " + " | ".join(cells) + f" | {'; '.join(notes)} |")
    out.append("")
    # Figures.
    figs = [figure_rows(r) for r in reports]
    names = list(dict.fromkeys(k for f in figs for k in f))
    out.append("| figure | " + " | ".join(labels) + " |")
    out.append("|---|" + "---|" * len(labels))
    for name in names:
        out.append(f"| {name} | " + " | ".join(f.get(name, "—") for f in figs) + " |")
    return "\n".join(out) + "\n"


def replace_section(text: str, body: str) -> str:
    """``text`` with the lines between the bench markers replaced by ``body`` (markers kept)."""
    start = text.find(START)
    end = text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"no '{START} ...' / '{END}' markers in order")
    start_line_end = text.index("\n", start) + 1
    return text[:start_line_end] + body + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+", type=Path, help="`medcli bench --json` outputs")
    parser.add_argument("--write", type=Path, help="replace the bench section of this markdown file")
    parser.add_argument("--note", action="append", default=[], help="a line to add under the machines")
    args = parser.parse_args(argv)
    try:
        reports = [json.loads(p.read_text()) for p in args.reports]
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: cannot read a report: {e}", file=sys.stderr)
        return 2
    body = render(reports, args.note)
    if args.write:
        atomic_write_text(args.write, replace_section(args.write.read_text(), body))
    else:
        sys.stdout.write(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
