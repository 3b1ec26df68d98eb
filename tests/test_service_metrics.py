"""``/metrics`` as Prometheus scrapes it, parsed with prometheus_client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import metric_sum, scrape

EXPECTED = {
    "dyce_requests": "counter",
    "dyce_request_duration_seconds": "histogram",
    "dyce_queue_duration_seconds": "histogram",
    "dyce_inference_duration_seconds": "histogram",
    "dyce_batch_size": "histogram",
    "dyce_exits": "counter",
    "dyce_relative_macs": "histogram",
    "dyce_active_lambda": "gauge",
    "dyce_active_config_index": "gauge",
    "dyce_config_switches": "counter",
    "dyce_queue_depth": "gauge",
    "dyce_in_flight_requests": "gauge",
    "dyce_rejections": "counter",
    "dyce_autoswitch_decisions": "counter",
    "dyce_model_ready": "gauge",
}


def test_metric_names_types_and_buckets(live_server):
    text = httpx.get(f"{live_server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED.items():
        assert families[name].type == kind, name
    buckets = {s.labels["le"] for s in families["dyce_inference_duration_seconds"].samples if "le" in s.labels}
    assert {"0.0001", "0.00025", "0.0005"} <= buckets, "sub-millisecond exits need sub-millisecond buckets"


def test_counters_follow_the_answers(live_server, client, fmnist_pngs):
    state = live_server.engine.state
    before = scrape(live_server.url)
    answers = [
        client.post("/v1/classify", params=params, content=png, headers={"content-type": "image/png"}).json()
        for png in fmnist_pngs[:30]
        for params in ({}, {"lambda": 0.0})
    ]
    # A parameterised route, so the cardinality check below does not depend on other tests.
    assert client.post("/v2/models/dyce/infer", content=b"{").status_code == 400
    after = scrape(live_server.url)

    def delta(name: str, **labels: str) -> float:
        return metric_sum(after, name, **labels) - metric_sum(before, name, **labels)

    assert delta("dyce_requests_total", route="/v1/classify", status="200") == len(answers)
    assert delta("dyce_exits_total") == len(answers)
    for position in {a["exit_position"] for a in answers}:
        expected = sum(a["exit_position"] == position for a in answers)
        assert delta("dyce_exits_total", position=str(position)) == expected
    assert abs(delta("dyce_relative_macs_sum") - sum(a["relative_macs"] for a in answers)) < 1e-6
    assert delta("dyce_relative_macs_count") == len(answers)
    assert delta("dyce_queue_duration_seconds_count") == len(answers)
    assert delta("dyce_batch_size_sum") == len(answers)
    # Requests that asked for another tier than the active one are counted as request switches.
    overridden = sum(a["tier"]["config_id"] != state.active.tier.config_id for a in answers)
    assert delta("dyce_config_switches_total", reason="request") == overridden > 0
    assert metric_sum(after, "dyce_active_lambda") == state.active.tier.lam
    assert metric_sum(after, "dyce_active_config_index") == state.active.tier.index
    assert metric_sum(after, "dyce_model_ready") == 1
    # Route labels are templates, never concrete paths or query strings: bounded cardinality.
    routes = {dict(labels)["route"] for (name, labels) in after if name == "dyce_requests_total"}
    assert "/v2/models/{name}/infer" in routes and "/v2/models/dyce/infer" not in routes
    assert all(route == "unmatched" or ("?" not in route and route.startswith("/")) for route in routes)
