"""Prometheus config, alert rules and the Grafana dashboard, checked with the real tools: promtool,
the service's live ``/metrics``, and a real Prometheus server scraping a real service."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import DyceServeProcess, LiveServer, free_port, service_settings

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "dyce-serve.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = GRAFANA_DIR / "provisioning" / "dashboards" / "dyce.yml"

# What the issue asks the dashboard to show, as the metric families that carry it.
DASHBOARD_MUST_SHOW = {
    "request rate": "dyce_requests_total",
    "latency percentiles": "dyce_request_duration_seconds_bucket",
    "exit rate per position": "dyce_exits_total",
    "active lambda": "dyce_active_lambda",
    "switches": "dyce_config_switches_total",
    "relative MACs spent": "dyce_relative_macs_sum",
    "queue depth": "dyce_queue_depth",
    "rejections by reason": "dyce_rejections_total",
    "batch size": "dyce_batch_size_bucket",
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60)


# --- PromQL ------------------------------------------------------------------------------------
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPINGS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_CALLS = re.compile(r"\b[a-zA-Z_]\w*\s*\(")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "group_left", "group_right"}
_IDENTIFIER = re.compile(r"(?<![\w$.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Series names an expression selects. PromQL's grammar is small enough for this: drop strings,
    label matchers, range/offset durations, grouping clauses and function calls; what identifiers
    remain are metric names."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPINGS.sub(" ", text)
    text = _CALLS.sub(" ( ", text)
    text = re.sub(r"\boffset\s+\S+", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def test_metric_name_extraction_on_known_expressions():
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, route) (rate(dyce_request_duration_seconds_bucket{route=~"/v1/.*",'
        ' instance=~"$instance"}[$__rate_interval])))'
    ) == {"dyce_request_duration_seconds_bucket"}
    assert metric_names(
        '(sum(rate(a_total{reason=~"x|y"}[5m])) or vector(0)) / on (instance) group_left sum without (le) (b)'
        " > bool 0.5 and c offset 5m"
    ) == {"a_total", "b", "c"}


def exported_sample_names(metrics_text: str) -> set[str]:
    """Every series name the exposition can produce, from the family types: a labelled counter that
    has not been incremented yet shows only its HELP/TYPE lines, but its series name is known."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created")}
    suffixes |= {"gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",)}
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
        names |= {sample.name for sample in family.samples}
    return names


# --- dashboard ---------------------------------------------------------------------------------
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query in the dashboard, the variables' queries included."""
    board = dashboard()
    queries = [(p["title"], t["expr"]) for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append((f"${variable['name']}", match.group(1)))
    return queries


def rule_expressions() -> list[tuple[str, str]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())["groups"]
    return [(rule["alert"], rule["expr"]) for group in groups for rule in group["rules"]]


def test_promtool_accepts_config_and_rules_and_their_unit_tests():
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "rules.yml")):
        checked = promtool(*args)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "rules.test.yml")
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules.yml"]
    tested_alerts = {
        case["alertname"]
        for test in yaml.safe_load((PROMETHEUS_DIR / "rules.test.yml").read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested_alerts == {name for name, _ in rule_expressions()}, "every alert has a firing unit test"


def test_latency_alert_threshold_is_the_services_slo():
    from service import Settings

    (expr,) = [expr for name, expr in rule_expressions() if name == "DyceLatencyP95OverSLO"]
    threshold_s = float(re.search(r"\)\s*>\s*([0-9.]+)\s*$", expr).group(1))
    assert threshold_s * 1e3 == Settings.model_fields["slo_p95_ms"].default
    config = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())["data"]
    assert threshold_s * 1e3 == float(config["DYCE_SLO_P95_MS"])


def test_dashboard_is_importable_as_is():
    text = DASHBOARD.read_text()
    board = json.loads(text)
    # An export "for sharing externally" has __inputs and ${DS_...} placeholders that only the
    # import dialog fills in; this one must load through provisioning and the import API alike.
    assert "__inputs" not in board and "${DS_" not in text
    assert board["uid"] == "dyce-serve" and board["title"] and board["schemaVersion"] >= 36
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        covered = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not covered & cells, f"panel {p['title']!r} overlaps another"
        cells |= covered

    variables = {v["name"]: v for v in board["templating"]["list"]}
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    (prometheus,) = [d for d in provisioned if d["type"] == "prometheus"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == prometheus["uid"], "defaults to the provisioned uid"
    data_panels = [p for p in panels if p["type"] != "row"]
    for p in data_panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for target in p["targets"]:
            assert target["datasource"] == p["datasource"] and target["expr"].strip(), p["title"]
    exit_panels = [
        p for p in data_panels if "dyce_exits_total" in p["targets"][0]["expr"] and p["type"] == "timeseries"
    ]
    assert [p["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] for p in exit_panels] == ["normal"]
    (saver_share,) = [p for p in data_panels if 'position="saver"' in p["targets"][0]["expr"]]
    assert saver_share["fieldConfig"]["defaults"]["unit"] == "percentunit"

    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == ["/var/lib/grafana/dashboards"]


def test_dashboard_covers_what_the_issue_asks_for():
    names = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    missing = {what: metric for what, metric in DASHBOARD_MUST_SHOW.items() if metric not in names}
    assert not missing
    assert any(expr.startswith("histogram_quantile(") for _, expr in dashboard_queries())


def test_dashboard_and_alerts_name_only_metrics_the_service_exports(client):
    exported = exported_sample_names(client.get("/metrics").text)
    assert "dyce_exits_total" in exported and "dyce_request_duration_seconds_bucket" in exported
    for source, expr in dashboard_queries() + rule_expressions():
        names = metric_names(expr)
        assert names, f"{source}: no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{source}: {sorted(unknown)} not exported by the service"


# --- real Prometheus ---------------------------------------------------------------------------
class PrometheusServer:
    """The Debian ``prometheus`` binary on a loopback port, scraping ``target`` every second with
    the repository's config (rules included)."""

    def __init__(self, target: str, workdir: Path) -> None:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["static_configs"] = [{"targets": [target]}]
        self.job = job["job_name"]
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.storage = workdir / "data"
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = workdir / "prometheus.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> PrometheusServer:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    "prometheus",
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.storage}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_for(lambda: httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200, "Prometheus ready")
        return self

    def __exit__(self, *_) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            try:
                if condition():
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"{what}: not within {timeout} s\n{self.log.read_text()[-3000:]}")

    def query(self, expr: str) -> list[dict]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert answer["status"] == "success", f"{expr}: {answer}"
        return answer["data"]["result"]

    def values(self, expr: str, label: str) -> dict[str, float]:
        return {series["metric"].get(label, ""): float(series["value"][1]) for series in self.query(expr)}

    def scraped_after(self, moment: float) -> None:
        """Block until a successful scrape has started after ``moment`` (wall clock), so what it
        read includes everything finished before then."""

        def fresh() -> bool:
            up = self.query(f'up{{job="{self.job}"}} == 1')
            return bool(up) and float(self.query(f'timestamp(up{{job="{self.job}"}})')[0]["value"][1]) > moment

        self.wait_for(fresh, "a scrape after the traffic")


def exported_totals(prometheus: PrometheusServer) -> dict[str, dict[str, float]]:
    return {
        "exits": prometheus.values("dyce_exits_total", "position"),
        "classify_count": prometheus.values(
            'dyce_request_duration_seconds_count{route="/v1/classify"}', "route"
        ),  # fmt: skip
        "classify_sum": prometheus.values('dyce_request_duration_seconds_sum{route="/v1/classify"}', "route"),
        "classify_ok": prometheus.values('dyce_requests_total{route="/v1/classify", status="200"}', "route"),
        "switches": prometheus.values("dyce_config_switches_total", "reason"),
    }


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {key: value - before.get(key, 0.0) for key, value in after.items() if value - before.get(key, 0.0)}


def classify_all(server: LiveServer | DyceServeProcess, pngs: list[bytes]) -> tuple[list[dict], list[float]]:
    def one(png: bytes) -> tuple[dict, float]:
        started = time.perf_counter()
        response = httpx.post(f"{server.url}/v1/classify", content=png, headers={"content-type": "image/png"})
        elapsed = time.perf_counter() - started
        assert response.status_code == 200, response.text
        return response.json(), elapsed

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, pngs))
    return [a for a, _ in answers], [e for _, e in answers]


@pytest.mark.parametrize("processes", ["one process", "HTTP workers"])
def test_real_prometheus_sees_exits_lambda_and_latency(core_demo_artifacts, fmnist_pngs, tmp_path, processes):
    """One process, or HTTP workers in front of the engine: each scrape reaches one worker, and
    must still report the whole server (prometheus-client's multiprocess mode)."""
    settings = service_settings(core_demo_artifacts, autoswitch="manual", slo_p95_ms=60_000)  # no 429 on a busy host
    serving = LiveServer(settings) if processes == "one process" else DyceServeProcess(core_demo_artifacts)
    with serving as server, PrometheusServer(f"127.0.0.1:{server.port}", tmp_path) as prometheus:
        prometheus.wait_for(lambda: prometheus.values("up", "job") == {prometheus.job: 1.0}, "target up")
        bank = httpx.get(f"{server.url}/admin/bank", headers=server.admin()).json()["entries"]
        cheapest = min(bank, key=lambda e: e["expected_relative_macs"])
        assert not cheapest["active"], "the service starts on an accurate tier, so the switch changes something"
        prometheus.scraped_after(time.time())
        before = exported_totals(prometheus)

        answers, latencies = classify_all(server, fmnist_pngs[:40])
        # The operator's tool, as the README runs it inside a container: token and port from the env.
        switched = subprocess.run(
            [sys.executable, str(ROOT / "deploy" / "switch_tier.py"), "--lambda", str(cheapest["lambda"])],
            env={"DYCE_ADMIN_TOKEN": settings.admin_token.get_secret_value(), "DYCE_PORT": str(server.port)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert switched.returncode == 0, switched.stderr
        active = json.loads(switched.stdout)
        assert active["tier"]["bank_index"] == cheapest["bank_index"] and active["mode"] == "manual"
        more_answers, more_latencies = classify_all(server, fmnist_pngs[40:80])
        answers, latencies = answers + more_answers, latencies + more_latencies
        bad = httpx.post(f"{server.url}/v1/classify", content=b"not an image", headers={"content-type": "image/png"})
        assert bad.status_code == 400
        prometheus.scraped_after(time.time())
        after = exported_totals(prometheus)

        exits_seen = Counter(str(a["exit_position"]) for a in answers)
        assert len(exits_seen) >= 2, "the two tiers exit at different positions"
        assert delta(after["exits"], before["exits"]) == exits_seen
        rates = prometheus.values("sum by (position) (rate(dyce_exits_total[30s]))", "position")
        assert {p for p, r in rates.items() if r > 0} == set(exits_seen)

        assert prometheus.values("dyce_active_lambda", "job") == {prometheus.job: cheapest["lambda"]}
        assert prometheus.values("dyce_active_config_index", "job") == {prometheus.job: cheapest["bank_index"]}
        assert delta(after["switches"], before["switches"]) == {"admin": 1.0}

        route = "/v1/classify"
        assert delta(after["classify_count"], before["classify_count"]) == {route: len(answers) + 1}
        assert delta(after["classify_ok"], before["classify_ok"]) == {route: len(answers)}
        server_seconds = delta(after["classify_sum"], before["classify_sum"])[route]
        assert 0 < server_seconds <= sum(latencies) + bad.elapsed.total_seconds()
        buckets = prometheus.values(f'dyce_request_duration_seconds_bucket{{route="{route}"}}', "le")
        ordered = [buckets[le] for le in sorted(buckets, key=float)]
        assert ordered == sorted(ordered) and buckets["+Inf"] == after["classify_count"][route]
        rate = f'rate(dyce_request_duration_seconds_bucket{{route="{route}"}}[30s])'
        (p95,) = prometheus.values(f"histogram_quantile(0.95, sum by (le) ({rate}))", "").values()
        assert 0 < p95 <= max(latencies) * 1.5 and math.isfinite(p95)

        # Every dashboard query runs in this Prometheus and finds data, as Grafana would render it.
        for title, expr in dashboard_queries():
            grafana_expr = expr.replace("$__rate_interval", "30s").replace('"$instance"', '".*"')
            assert prometheus.query(grafana_expr), f"{title}: no data for {grafana_expr}"

        groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = {rule["name"]: rule["health"] for group in groups for rule in group["rules"]}
        assert loaded == dict.fromkeys((name for name, _ in rule_expressions()), "ok")
