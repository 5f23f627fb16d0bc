"""Benchmark rows, and what is made of them: the printed table, JSON, a bar chart.

A row is one path measured in one run: its median over the repeats, and its
ratio to the baseline of its group measured in the same run (the machine is
shared and noisy; ratios travel, absolute numbers less).  JSON rows carry
``path``, ``direction``, ``streams``, ``gbits``, ``ratio``, and also
``group`` (``namespace`` or ``vm``), ``baseline`` (the path the ratio is to)
and ``samples`` (every repeat, Gbit/s).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

GROUP_TITLES = {
    "namespace": "namespace guests (kernel stacks, no VMM)",
    "vm": "QEMU VMs (TCG, 1 vCPU each)",
}


@dataclass
class Row:
    path: str
    direction: str
    streams: int
    gbits: float
    ratio: float
    group: str
    baseline: str
    samples: list[float] = field(default_factory=list)


def rows(group: str, results: dict[str, list[float]], baseline: str, *, direction: str, streams: int) -> list[Row]:
    """Rows for one group from {path: samples}; ``baseline`` names the path the ratios are to."""
    base = statistics.median(results[baseline])
    return [
        Row(path, direction, streams, round(statistics.median(s), 4), round(statistics.median(s) / base, 4), group,
            baseline, [round(x, 4) for x in s])  # fmt: skip
        for path, s in results.items()
    ]


def table(all_rows: list[Row]) -> str:
    lines = []
    for group in dict.fromkeys(r.group for r in all_rows):
        group_rows = [r for r in all_rows if r.group == group]
        first = group_rows[0]
        lines.append(f"{GROUP_TITLES.get(group, group)}: {first.direction}, {first.streams} stream(s), "
                     f"median of {len(first.samples)}; ratio to {first.baseline!r}")  # fmt: skip
        for r in group_rows:
            spread = f"{min(r.samples):.3g}-{max(r.samples):.3g}"
            lines.append(f"  {r.path:<28} {r.gbits:8.3f} Gbit/s  ({spread:>11})  x{r.ratio:5.2f}")
    return "\n".join(lines)


def write_json(path: str | Path, all_rows: list[Row], meta: dict) -> None:
    Path(path).write_text(json.dumps({**meta, "rows": [asdict(r) for r in all_rows]}, indent=2) + "\n")


def read_json(path: str | Path) -> tuple[list[Row], dict]:
    obj = json.loads(Path(path).read_text())
    return [Row(**r) for r in obj.pop("rows")], obj


def draw(all_rows: list[Row], png: str | Path, title: str, note: str = "") -> None:
    """Horizontal bars, one panel per group (their scales differ ~30x): median, min-max whiskers, ratio labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in all_rows))
    most = max(len([r for r in all_rows if r.group == g]) for g in groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(6.2 * len(groups), 1.3 + 0.55 * most), squeeze=False)
    for ax, group in zip(axes[0], groups):
        group_rows = [r for r in all_rows if r.group == group][::-1]  # baseline on top
        labels = [f"{r.path} (baseline)" if r.path == r.baseline else r.path for r in group_rows]
        colors = ["#9e9e9e" if r.path == r.baseline else "#1f77b4" for r in group_rows]
        whiskers = [[r.gbits - min(r.samples) for r in group_rows], [max(r.samples) - r.gbits for r in group_rows]]
        ax.barh(labels, [r.gbits for r in group_rows], color=colors, height=0.6,
                xerr=whiskers, error_kw={"ecolor": "#444444", "capsize": 3, "lw": 1})  # fmt: skip
        top = max(max(r.samples) for r in group_rows)
        for y, r in enumerate(group_rows):
            ax.text(max(r.samples) + top * 0.03, y, f"{r.gbits:.3g} Gbit/s  ×{r.ratio:.2f}", va="center", fontsize=9)
        ax.set_xlim(0, top * 1.5)
        ax.set_xlabel("Gbit/s: median, whiskers min–max")
        ax.set_title(f"{GROUP_TITLES.get(group, group)}\n×: ratio to {group_rows[-1].baseline}", fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
    fig.suptitle(title, fontsize=10)
    if note:
        fig.text(0.5, 0.01, note, ha="center", fontsize=8.5, style="italic")
    fig.tight_layout(rect=(0, 0.05 if note else 0, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)
