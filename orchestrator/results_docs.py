"""The docs' measured figures, rendered from the data files under ``docs/results/``.

A page quotes a figure only inside a marked block::

    <!-- results:noise_budget -->
    ... rendered from docs/results/noise_budget.json ...
    <!-- /results:noise_budget -->

``python -m orchestrator.results_docs`` rewrites every block of README.md and docs/*.md from
the data; ``--check`` changes nothing and exits 1 naming each block that disagrees with its
data (the tests run it). Each block names its data file, the command, commit, date and CPU
that produced it, so a reader can re-measure on another machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- results:(\w+) -->\n)(.*?)(<!-- /results:\2 -->)", re.S)


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _source(data: dict[str, Any], name: str) -> str:
    return (
        f"*Data: `docs/results/{name}.json`, from `{data['command']}` at commit "
        f"{data['commit'][:7]} on {data['date']}, {data['cpu']} ({data['cores']} cores), torch "
        f"{data['torch']}, Ray {data['ray']}, device {data['device']}.*"
    )


def _num(value: Any, fmt: str = ".2f") -> str:
    return "" if value is None else format(float(value), fmt)


def _interval(low: Any, high: Any) -> str:
    if low is None or high is None:
        return ""
    return f"[{float(low):+.2f}, {float(high):+.2f}]"


def render_demo(data: dict[str, Any]) -> str:
    lines = [
        "| pair set | n | rsum [95% CI seeds] | gain [95% CI seeds + eval set] | eval share "
        "| p adj (differs / within margin) | verdict |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in data["table"]:
        base = row["verdict"] == "baseline"
        gain = (
            "—"
            if base
            else f"{row['gain_mean']:+.2f} {_interval(row['gain_low'], row['gain_high'])}"
        )
        share = "" if base or row["eval_share"] is None else f"{100 * row['eval_share']:.0f}%"
        p = "" if base else f"{_num(row['p_diff_adj'], '.3f')} / {_num(row['p_equiv_adj'], '.3f')}"
        verdict = row["verdict"] if base or row["verdict"] != "open" else (
            f"open ({row['verdict_note']})")  # fmt: skip
        rsum = f"{row['rsum_mean']:.2f} [{_num(row['rsum_ci_low'])}, {_num(row['rsum_ci_high'])}]"
        lines.append(f"| {row['pair_set']} | {row['seeds']} | {rsum} | {gain} | {share} | {p} "
                     f"| {verdict} |")  # fmt: skip
    seconds = ", ".join(f"{s} s" for s in data["demo_reported_s"])
    lines += ["", f"Margin ±{data['margin']:g} rsum, {data['design']}; {data['trials']} trials; "
              f"the demo reported: {seconds}."]  # fmt: skip
    if data.get("race", {}).get("stopped"):
        lines.append(f"The race stopped early: {data['race']['stopped']}.")
    lines += [f"`{line}`" for line in data.get("open_lines", [])]
    return "\n".join([*lines, "", _source(data, "demo")])


def render_noise_budget(data: dict[str, Any]) -> str:
    summary = data["summary"]
    lines = [
        "| protocol | per-seed sd of a paired gain | eval-set SE of a gain | seconds per trial "
        "| seeds for a +5 gain (19 cells / 4 cells) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label in ("before", "after"):
        part = summary[label]
        need = part["seeds_for_gain_5"]
        lines.append(
            f"| {label}: `{part['config']}` | {part['seed_sd']:.2f} | {part['eval_se']:.2f} "
            f"| {part['trial_s']:.1f} | {need['family_19']['seeds']} / "
            f"{need['family_4']['seeds']} |"
        )
    ratio = summary["seeds_ratio_family_19"]
    lines += [
        "",
        f"Seeds a typical cell needs, after / before: {ratio:.2f} (19 cells). "
        f"Measured: {data['what']}.",
    ]
    return "\n".join([*lines, "", _source(data, "noise_budget")])


def render_aa_calibration(data: dict[str, Any]) -> str:
    lines = [
        "| decided as | null decisions | false (better/worse) | equivalent | open "
        "| family-wise error (95% CI over grids) | trials per grid |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode in ("fixed", "race"):
        t = data[mode]
        low, high = t["family_wise_error_95ci_over_grids"]
        lines.append(
            f"| {mode} | {t['replicates']} | {t['better'] + t['worse']} "
            f"({100 * t['false_decision_rate']:.1f}%) | {t['equivalent']} | {t['open']} "
            f"| {t['family_wise_error']:.3f} [{low:.3f}, {high:.3f}] "
            f"| {t['trials_per_grid']:.1f} |"
        )
    lines += [
        "",
        f"{data['grids']} A/A grids of {data['cells_per_grid']} null cells, seeds "
        f"{data['seeds'][0]}..{data['seeds'][1]}, margin ±{data['margin']:g}, drawn from "
        f"{data['pool_runs']} baseline runs under independent seeds. {data['what']}.",
    ]
    return "\n".join([*lines, "", _source(data, "aa_calibration")])


def render_time_to_verdict(data: dict[str, Any]) -> str:
    ref = data["reference"]
    v = data["verdict"]
    lines = [
        "| run | decided cells | wall time | decided per hour |",
        "|---|---:|---:|---:|",
        f"| `{data['race_command']}` | {data['decided']} of {data['cells']} "
        f"({len(v['better'])} better, {len(v['worse'])} worse, {len(v['equivalent'])} "
        f"equivalent) | {data['wall_s'] / 60:.1f} min | {data['decided_per_hour']:.1f} |",
        f"| reference: {ref['source']} | {ref['decided']} | {ref['minutes']:.1f} min "
        f"| {ref['decided_per_hour']:.1f} |",
        "",
        f"{data['trials']} trials in {data['rounds']} rounds "
        f"({100 * data['spent_steps'] / data['full_steps']:.0f}% of the full grid's "
        f"trial-steps); decided per hour against the reference: "
        f"{data['speedup_decided_per_hour']:.2f}x.",
    ]
    return "\n".join([*lines, "", _source(data, "time_to_verdict")])


def render_gpu_packing(data: dict[str, Any]) -> str:
    rows = ["| setting | samples/s |", "|---|---:|"]
    for key, value in data.get("samples_per_s", {}).items():
        rows.append(f"| {key} | {float(value):.1f} |")
    return "\n".join([*rows, "", _source(data, "gpu_packing")])


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "demo": render_demo,
    "noise_budget": render_noise_budget,
    "aa_calibration": render_aa_calibration,
    "time_to_verdict": render_time_to_verdict,
    "gpu_packing": render_gpu_packing,
}


def render(name: str) -> str:
    """The block ``name`` from its data file, or a line saying the file is absent."""
    if name not in RENDERERS:
        raise KeyError(f"results block {name!r}: expected one of {', '.join(RENDERERS)}")
    data = _load(name)
    if data is None:
        return f"*Not measured here: `docs/results/{name}.json` is absent.*"
    return RENDERERS[name](data)


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def rewrite(text: str) -> str:
    return BLOCK.sub(lambda m: f"{m.group(1)}{render(m.group(2))}\n{m.group(4)}", text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 on a diff")
    args = parser.parse_args(argv)
    stale = []
    for page in pages():
        text = page.read_text()
        new = rewrite(text)
        if new == text:
            continue
        if args.check:
            names = [
                m.group(2)
                for m in BLOCK.finditer(text)
                if f"{m.group(1)}{render(m.group(2))}\n{m.group(4)}" != m.group(0)
            ]
            stale += [f"{page.relative_to(ROOT)}: {name}" for name in names]
        else:
            page.write_text(new)
    for line in stale:
        print(f"results_docs: stale block {line} (run python -m orchestrator.results_docs)")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
