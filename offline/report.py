"""Step `report`: the trade-off plot in the style of the paper's Fig. 4-6 and Table II.

* ``report.png``: accuracy vs relative MACs of every bank configuration (search and test),
  one curve per algorithm (iterative, single-pass, the one-type/one-threshold baseline), every
  standalone exit and the original model.
* ``report.md`` / ``report.json``: the relative MACs needed at <= 0.5 %, 2 %, 5 % accuracy drop,
  where the drop is relative to the backbone's own accuracy on that split (relative accuracy A
  of eq. 10 >= 1 - drop).

  The honest figure is ``test_at_drop_chosen_on_search``: a user picks a tier by what the search
  split says (the cheapest configuration within the drop there), and what that choice does on
  the test split is what they get. ``test_rel_macs_at_drop_chosen_on_test`` picks the cheapest
  configuration within the drop *on the test split itself*, which selects on the evaluation data
  and flatters the bank; it is kept, under that name, for comparison with earlier reports.
"""

from __future__ import annotations

import json

import matplotlib
import numpy as np

from dyce.bank import Bank, BankEntry
from dyce.savers import SAVER_POSITION
from dyce.simulate import ExitRecords

from .layout import OfflineLayout
from .provenance import current_inputs, write_step_manifest
from .records import load_records

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

DROPS = ("0.5", "2", "5")
STYLES = {"iterative": ("tab:red", "o"), "single_pass": ("tab:blue", "s"), "baseline": ("tab:gray", "^")}


def _split_metrics(entry: BankEntry, split: str):
    return entry.search if split == "search" else entry.test


def macs_at_drop(entries: list[BankEntry], split: str) -> dict[str, float | None]:
    """Cheapest relative MACs among entries within each accuracy drop ON ``split`` itself (None:
    none is). On the test split this selects on the evaluation data: see the module doc."""
    points = [(m.relative_accuracy, m.relative_macs) for e in entries if (m := _split_metrics(e, split)) is not None]
    return {drop: min((c for a, c in points if a >= 1 - float(drop) / 100 - 1e-12), default=None) for drop in DROPS}


def choose_on_search(entries: list[BankEntry], drop: float) -> BankEntry | None:
    """What a user picking by the search split gets: the cheapest entry whose search accuracy is
    within ``drop`` percent of the backbone's (ties: the more accurate on search)."""
    within = [e for e in entries if e.search.relative_accuracy >= 1 - drop / 100 - 1e-12]
    return min(within, key=lambda e: (e.search.relative_macs, -e.search.accuracy), default=None)


def test_at_drop_chosen_on_search(entries: list[BankEntry]) -> dict[str, dict | None]:
    """Per drop: the configuration chosen on search and where it lands on the test split."""
    chosen = {}
    for drop in DROPS:
        entry = choose_on_search(entries, float(drop))
        if entry is None or entry.test is None:
            chosen[drop] = None
            continue
        chosen[drop] = {
            "lam": entry.lam,
            "algorithm": entry.algorithm,
            "config_id": entry.config_id,
            "search_rel_macs": entry.search.relative_macs,
            "search_drop_percent": 100 * (1 - entry.search.relative_accuracy),
            "test_rel_macs": entry.test.relative_macs,
            "test_drop_percent": 100 * (1 - entry.test.relative_accuracy),
        }
    return chosen


def front_points(entries: list[BankEntry], split: str) -> int:
    """How many configurations lie on the accuracy/MACs Pareto front of ``split``."""
    points = [(m.accuracy, m.relative_macs) for e in entries if (m := _split_metrics(e, split)) is not None]
    return len(_front(points)) if points else 0


def standalone_exits(records: ExitRecords, bank: Bank) -> list[tuple[float, float, str, bool]]:
    """(accuracy, relative MACs, kind, is a saver) of every candidate used alone as the model's
    only exit."""
    candidates = bank.candidates()
    segments = bank.macs.relative_segments()
    points = []
    for n in range(records.num_positions - 1):
        for k in range(1, records.num_candidates[n] + 1):
            cost = float(segments[: n + 1].sum() + bank.macs.relative_exit(n, k))
            saver = bank.saver_stage and n == SAVER_POSITION
            points.append((float(records.correct[n, k - 1].mean()), cost, candidates[(n, k)].kind, saver))
    return points


def _front(points: list[tuple[float, float]]) -> np.ndarray:
    ordered = sorted(points, key=lambda p: (p[1], -p[0]))
    front, best = [], -1.0
    for acc, cost in ordered:
        if acc > best:
            front.append((cost, acc))
            best = acc
    return np.array(front)


def plot(
    bank: Bank,
    records: dict[str, ExitRecords],
    path,
    chosen: dict[str, dict | None] | None = None,
    without_saver: Bank | None = None,
) -> None:
    """``without_saver``: the bank searched without the saver stage, drawn as one dashed front."""
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
        if without_saver is not None:
            points = [(m.accuracy, m.relative_macs) for e in without_saver.entries if (m := _split_metrics(e, split))]
            front = _front(points)
            ax.plot(front[:, 0], front[:, 1], color="black", ls="--", lw=1.2, label="without saver (all algorithms)")
        for acc, cost, _, saver in standalone_exits(records[split], bank):
            colour = "tab:purple" if saver else "tab:green"
            ax.scatter(
                cost, acc, s=40 if saver else 10, marker="P" if saver else "x", color=colour, alpha=0.8, zorder=4
            )
        ax.scatter([], [], marker="x", color="tab:green", label="standalone exits")
        if bank.savers:
            ax.scatter([], [], marker="P", color="tab:purple", label="savers alone")
        ax.scatter([1.0], [bank.original_accuracy[split]], s=60, marker="*", color="black", label="original model")
        # The tiers a user would pick on the search split, where they are on this split.
        picks = [(drop, c) for drop, c in (chosen or {}).items() if c is not None]
        for drop, c in picks:
            cost = c[f"{split}_rel_macs"]
            acc = bank.original_accuracy[split] * (1 - c[f"{split}_drop_percent"] / 100)
            ax.scatter(cost, acc, s=70, facecolors="none", edgecolors="black", linewidths=1.2)
            ax.annotate(
                f"<= {drop} % on search: {c[f'{split}_drop_percent']:.2f} % drop, {cost:.3f}",
                (cost, acc),
                textcoords="offset points",
                xytext=(6, -10),
                fontsize=7,
            )
        if picks:
            ax.scatter([], [], s=70, facecolors="none", edgecolors="black", label="chosen on search (<= 0.5/2/5 %)")
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


def _step_report(path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def make_report(layout: OfflineLayout) -> dict:
    inputs = current_inputs(layout, ("records", "bank"))
    bank = Bank.load(layout.bank)
    _, records = load_records(layout)
    entries = list(bank.entries)
    by_algorithm = {a: [e for e in entries if e.algorithm == a] for a in dict.fromkeys(e.algorithm for e in entries)}
    report: dict = {
        "backbone": bank.backbone.name,
        "original_accuracy": bank.original_accuracy,
        "entries": len(entries),
        "frontier_entries": len(bank.frontier()),
        "distinct_configurations": len({e.config for e in entries}),
        "front_points": {
            split: {algorithm: front_points(chosen, split) for algorithm, chosen in by_algorithm.items()}
            for split in ("search", "test")
        },
        "search_rel_macs_at_drop": macs_at_drop(entries, "search"),
        "search_rel_macs_at_drop_by_algorithm": {a: macs_at_drop(c, "search") for a, c in by_algorithm.items()},
        "test_at_drop_chosen_on_search": test_at_drop_chosen_on_search(entries),
        "test_at_drop_chosen_on_search_by_algorithm": {
            a: test_at_drop_chosen_on_search(c) for a, c in by_algorithm.items()
        },
        "test_rel_macs_at_drop_chosen_on_test": macs_at_drop(entries, "test"),
        "test_rel_macs_at_drop_chosen_on_test_by_algorithm": {
            a: macs_at_drop(c, "test") for a, c in by_algorithm.items()
        },
    }
    numerics = {}
    for step, path in (
        ("train-backbone", layout.backbone_training),
        ("train-exits", layout.exit_training),
        ("train-saver", layout.saver_training),
    ):
        if (step_report := _step_report(path)) and "numerics" in step_report:
            numerics[step] = step_report["numerics"]
    if numerics:
        report["numerics"] = numerics
    without_saver = None
    if bank.saver_stage and layout.bank_without_saver.is_file():
        without_saver = Bank.load(layout.bank_without_saver)
        report["saver"] = saver_summary(bank, records, report["test_at_drop_chosen_on_search"], entries)
        report["without_saver"] = {
            "test_at_drop_chosen_on_search": test_at_drop_chosen_on_search(list(without_saver.entries)),
            "test_rel_macs_at_drop_chosen_on_test": macs_at_drop(list(without_saver.entries), "test"),
        }
    plot(bank, records, layout.report_png, report["test_at_drop_chosen_on_search"], without_saver)
    layout.report_json.write_text(json.dumps(report, indent=1))
    layout.report_md.write_text(markdown_table(report))
    write_step_manifest(layout, "report", "report", {}, inputs)
    return report


def saver_summary(
    bank: Bank, records: dict[str, ExitRecords], chosen: dict[str, dict | None], entries: list[BankEntry]
) -> dict:
    """Each saver alone (relative MACs, accuracy per split) and the share of test images the
    saver stage answers under each configuration chosen on search."""
    by_id = {e.config_id: e for e in entries}
    return {
        "candidates": [
            {
                "kind": saver.kind,
                "relative_macs": bank.macs.relative_exit(0, saver.index),
                "accuracy": {split: float(r.correct[0, saver.index - 1].mean()) for split, r in records.items()},
            }
            for saver in bank.savers
        ],
        "test_share_answered_at_drop_chosen_on_search": {
            drop: None if c is None or by_id[c["config_id"]].test is None else by_id[c["config_id"]].test.exit_rates[0]
            for drop, c in chosen.items()
        },
    }


def markdown_table(report: dict) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f} %"

    def landed(value: dict | None) -> str:
        if value is None:
            return "-"
        return f"{100 * value['test_rel_macs']:.1f} % MACs, {value['test_drop_percent']:.2f} % drop"

    lines = [
        f"# DyCE report: {report['backbone']}",
        "",
        "Original accuracy: " + ", ".join(f"{s} {100 * a:.2f} %" for s, a in report["original_accuracy"].items()),
        "",
        "## Chosen on the search split, measured on the test split",
        "",
        "The configuration a user would pick: the cheapest one within the accuracy drop on the search",
        "split (drop relative to the backbone). Cells: its relative MACs and accuracy drop on the test split.",
        "",
        "| chosen from | " + " | ".join(f"<= {d} % on search" for d in DROPS) + " |",
        "|---|" + "---|" * len(DROPS),
    ]
    rows = {"bank": report["test_at_drop_chosen_on_search"], **report["test_at_drop_chosen_on_search_by_algorithm"]}
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(landed(row[d]) for d in DROPS) + " |")
    lines += [
        "",
        "## Relative MACs needed at an accuracy drop of at most (Table II style)",
        "",
        "Each split's cheapest configuration within the drop on that same split. On the test split this",
        "selects on the evaluation data (optimistic); the table above is what a choice made in advance gets.",
        "",
        "| split | algorithm | " + " | ".join(f"<= {d} %" for d in DROPS) + " |",
        "|---|---|" + "---|" * len(DROPS),
    ]
    for split, key in (
        ("search", "search_rel_macs_at_drop"),
        ("test (chosen on test)", "test_rel_macs_at_drop_chosen_on_test"),
    ):
        rows = {"bank": report[key], **report[f"{key}_by_algorithm"]}
        for name, row in rows.items():
            lines.append(f"| {split} | {name} | " + " | ".join(cell(row[d]) for d in DROPS) + " |")
    if "saver" in report:
        lines += ["", "## Saver (TinySaver)", ""]
        for saver in report["saver"]["candidates"]:
            accuracy = ", ".join(f"{split} {100 * a:.2f} %" for split, a in saver["accuracy"].items())
            lines.append(f"- {saver['kind']}: {100 * saver['relative_macs']:.2f} % of the MACs; alone: {accuracy}")
        shares = report["saver"]["test_share_answered_at_drop_chosen_on_search"]
        lines.append(
            "- test images the saver answers, chosen on search: "
            + ", ".join(f"<= {d} %: {'-' if v is None else f'{100 * v:.1f} %'}" for d, v in shares.items())
        )
        plain = report["without_saver"]["test_at_drop_chosen_on_search"]
        lines.append(
            "- the same searches without a saver: " + ", ".join(f"<= {d} %: {landed(plain[d])}" for d in DROPS)
        )
    if "numerics" in report or "build" in report:
        lines += ["", "## Build", ""]
        for step, numerics in report.get("numerics", {}).items():
            lines.append(f"- {step}: {numerics['precision']} on {numerics['device']} ({numerics['reason']})")
        for step, seconds in report.get("build", {}).get("step_seconds", {}).items():
            lines.append(f"- {step}: {seconds:.1f} s")
    lines += ["", "![trade-off](report.png)", ""]
    return "\n".join(lines)
