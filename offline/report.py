"""Step `report`: the trade-off plot in the style of the paper's Fig. 4-6 and Table II.

* ``report.png``: accuracy vs relative MACs of every bank configuration (search and test),
  one curve per algorithm (iterative, single-pass, the one-type/one-threshold baseline), every
  standalone exit and the original model.
* ``report.md`` / ``report.json``: the relative MACs needed at <= 0.5 %, 2 %, 5 % accuracy drop,
  where the drop is relative to the backbone's own accuracy on that split (relative accuracy A
  of eq. 10 >= 1 - drop), as the cheapest configuration on that split's curve.
"""

from __future__ import annotations

import json

import matplotlib
import numpy as np

from dyce.bank import Bank, BankEntry
from dyce.simulate import ExitRecords

from .layout import OfflineLayout
from .records import load_records

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

DROPS = ("0.5", "2", "5")
STYLES = {"iterative": ("tab:red", "o"), "single_pass": ("tab:blue", "s"), "baseline": ("tab:gray", "^")}


def _split_metrics(entry: BankEntry, split: str):
    return entry.search if split == "search" else entry.test


def macs_at_drop(entries: list[BankEntry], split: str) -> dict[str, float | None]:
    """Cheapest relative MACs among entries within each accuracy drop (None: none is)."""
    points = [(m.relative_accuracy, m.relative_macs) for e in entries if (m := _split_metrics(e, split)) is not None]
    return {drop: min((c for a, c in points if a >= 1 - float(drop) / 100 - 1e-12), default=None) for drop in DROPS}


def standalone_exits(records: ExitRecords, bank: Bank) -> list[tuple[float, float, str]]:
    """(accuracy, relative MACs, kind) of every candidate used alone as the model's only exit."""
    kinds = {(e.position, e.index): e.kind for e in bank.exits}
    segments = bank.macs.relative_segments()
    points = []
    for n in range(records.num_positions - 1):
        for k in range(1, records.num_candidates[n] + 1):
            cost = float(segments[: n + 1].sum() + bank.macs.relative_exit(n, k))
            points.append((float(records.correct[n, k - 1].mean()), cost, kinds[(n, k)]))
    return points


def _front(points: list[tuple[float, float]]) -> np.ndarray:
    ordered = sorted(points, key=lambda p: (p[1], -p[0]))
    front, best = [], -1.0
    for acc, cost in ordered:
        if acc > best:
            front.append((cost, acc))
            best = acc
    return np.array(front)


def plot(bank: Bank, records: dict[str, ExitRecords], path) -> None:
    splits = [s for s in ("search", "test") if s in records]
    fig, axes = plt.subplots(1, len(splits), figsize=(6.5 * len(splits), 5), squeeze=False)
    algorithms = sorted({e.algorithm for e in bank.entries}, key=list(STYLES).index)
    for ax, split in zip(axes[0], splits, strict=True):
        for algorithm in algorithms:
            colour, marker = STYLES[algorithm]
            points = [
                (m.accuracy, m.relative_macs)
                for e in bank.entries
                if e.algorithm == algorithm and (m := _split_metrics(e, split)) is not None
            ]
            front = _front(points)
            ax.scatter([c for _, c in points], [a for a, _ in points], s=8, color=colour, alpha=0.35)
            ax.plot(front[:, 0], front[:, 1], color=colour, marker=marker, ms=3, lw=1.2, label=algorithm)
        for acc, cost, _ in standalone_exits(records[split], bank):
            ax.scatter(cost, acc, s=10, marker="x", color="tab:green", alpha=0.6)
        ax.scatter([], [], marker="x", color="tab:green", label="standalone exits")
        ax.scatter([1.0], [bank.original_accuracy[split]], s=60, marker="*", color="black", label="original model")
        top = bank.original_accuracy[split]
        ax.set_ylim(max(0.0, top - 0.25), min(1.0, top + 0.03))
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("relative MACs (eq. 11)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{bank.backbone.name}: {split} split")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_report(layout: OfflineLayout) -> dict:
    bank = Bank.load(layout.bank)
    _, records = load_records(layout)
    entries = list(bank.entries)
    by_algorithm = {a: [e for e in entries if e.algorithm == a] for a in dict.fromkeys(e.algorithm for e in entries)}
    report = {
        "backbone": bank.backbone.name,
        "original_accuracy": bank.original_accuracy,
        "entries": len(entries),
        "frontier_entries": len(bank.frontier()),
        "distinct_configurations": len({e.config for e in entries}),
    }
    for split in ("search", "test"):
        report[f"{split}_rel_macs_at_drop"] = macs_at_drop(entries, split)
        report[f"{split}_rel_macs_at_drop_by_algorithm"] = {
            algorithm: macs_at_drop(chosen, split) for algorithm, chosen in by_algorithm.items()
        }
    plot(bank, records, layout.report_png)
    layout.report_json.write_text(json.dumps(report, indent=1))
    layout.report_md.write_text(markdown_table(report))
    return report


def markdown_table(report: dict) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    lines = [
        f"# DyCE report: {report['backbone']}",
        "",
        "Original accuracy: " + ", ".join(f"{s} {100 * a:.2f} %" for s, a in report["original_accuracy"].items()),
        "",
        "Relative MACs needed at an accuracy drop of at most (Table II style; drop relative to the backbone):",
        "",
        "| split | algorithm | " + " | ".join(f"<= {d} %" for d in DROPS) + " |",
        "|---|---|" + "---|" * len(DROPS),
    ]
    for split in ("search", "test"):
        rows = {"bank": report[f"{split}_rel_macs_at_drop"], **report[f"{split}_rel_macs_at_drop_by_algorithm"]}
        for name, row in rows.items():
            lines.append(f"| {split} | {name} | " + " | ".join(cell(row[d]) for d in DROPS) + " |")
    lines += ["", "![trade-off](report.png)", ""]
    return "\n".join(lines)
