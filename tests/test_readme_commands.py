"""The README's request examples, run as a user would run them: the fenced block of "Using it",
as one bash script, against a real server (curl and jq, the tools the block uses)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN

README = Path(__file__).resolve().parents[1] / "README.md"


def _usage_block() -> str:
    text = README.read_text()
    section = text[text.index("## Using it") :]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq")), reason="needs curl and jq")
def test_readme_request_examples_work_as_written(live_server, fmnist_pngs, tmp_path):
    block = _usage_block()
    before = httpx.get(f"{live_server.url}/admin/active", headers=live_server.admin()).json()
    assert block.count("curl ") >= 8
    for name, image in zip(("shoe.png", "a.png", "b.png"), fmnist_pngs, strict=False):
        (tmp_path / name).write_bytes(image)
    script = block.replace("localhost:8000", f"127.0.0.1:{live_server.port}")
    # --fail-with-body: an HTTP error status fails the script, with the server's answer shown.
    prelude = 'set -euo pipefail\ncurl() { command curl --fail-with-body --max-time 30 "$@"; echo; }\n'
    result = subprocess.run(
        ["bash", "-c", prelude + script],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "TOKEN": ADMIN_TOKEN},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert '"predictions"' in result.stdout and "dyce_requests_total" in result.stdout
    # The examples switched tiers and handed them to the autoswitcher; leave the shared server
    # as the other tests expect it: pinned where it was.
    with httpx.Client(base_url=live_server.url, headers=live_server.admin()) as admin:
        admin.post("/admin/active", json={"index": before["tier"]["bank_index"]}).raise_for_status()
        assert admin.get("/admin/active").json()["mode"] == "manual"
