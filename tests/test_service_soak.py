"""bench/soak.py at CI size: the server's resident memory stays flat over thousands of requests,
pinned and then under the autoswitcher."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_soak_keeps_server_rss_flat(core_demo_artifacts):
    command = [sys.executable, str(BENCH / "soak.py"), "--artifacts", str(core_demo_artifacts)]
    command += ["--warmup", "500", "--pinned", "2000", "--auto", "500", "--step", "1000"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["requests"] == 3000 and sum(figures["statuses"].values()) == 3000
    assert figures["errors"] == 0, figures["statuses"]
    # Admission control may refuse a few on a busy host; the memory figures need the rest served.
    assert figures["statuses"]["200"] >= 0.9 * figures["requests"], figures["statuses"]
    assert figures["final_mode"] == "auto"
    assert abs(figures["rss_growth_pct"]) <= 5, figures
    assert figures["rss_end_mb"] > 50  # a real process's RSS, not a parsing accident
