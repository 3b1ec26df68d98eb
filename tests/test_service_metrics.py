"""``/metrics`` as Prometheus scrapes it, parsed with prometheus_client's own parser."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.engine.batcher import BatchReport
from service.metrics import LATENCY_BUCKETS, RELATIVE_MACS_BUCKETS, Metrics, observe_many
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


def _histogram_samples(registry: CollectorRegistry) -> tuple[dict[str, float], float]:
    """Bucket and count samples (exact), and the sum (added in another order: to the last bit)."""
    samples = {
        s.name + s.labels.get("le", ""): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if not s.name.endswith("_created")
    }
    return samples, samples.pop("h_sum")


def test_observing_many_values_at_once_equals_observing_them_one_by_one():
    """``observe_many`` against prometheus-client's own ``observe``, value by value: values on a
    bucket's bound, between bounds, past the last finite one, zero; large, small and empty batches."""
    rng = np.random.default_rng(0)
    for buckets in (LATENCY_BUCKETS, RELATIVE_MACS_BUCKETS):
        values = np.concatenate([buckets, rng.lognormal(-5, 3, 500), [0.0, 1e9, buckets[-1] * 1.0001]])
        one_by_one, at_once = CollectorRegistry(), CollectorRegistry()
        reference = Histogram("h", "h", buckets=buckets, registry=one_by_one)
        bulk = Histogram("h", "h", buckets=buckets, registry=at_once)
        for value in values:
            reference.observe(float(value))
        # Chunks above and below the size where observe_many starts counting buckets in bulk.
        for chunk in np.split(values, [300, 300, 303, 304, 310]):
            observe_many(bulk, chunk)
        counts, total = _histogram_samples(at_once)
        expected_counts, expected_total = _histogram_samples(one_by_one)
        assert counts == expected_counts
        assert total == pytest.approx(expected_total, rel=1e-12)


def test_a_step_counts_each_exit_position_and_cost_by_hand():
    metrics = Metrics()
    metrics.model_loaded(num_positions=4, saver_stage=True)
    positions = np.array([-1, 2, -1, 3, 2, -1])
    costs = np.array([0.05, 0.6, 0.05, 1.0, 0.6, 0.05])
    report = BatchReport(6, 6, 0.01, [0.001, 0.002], [0.01, 0.02], frozenset(), 0, positions, costs)
    metrics.batch_done(report)
    metrics.batch_done(report)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    exits = {labels[0][1]: value for (name, labels), value in samples.items() if name == "dyce_exits_total"}
    assert exits == {"saver": 6.0, "0": 0.0, "1": 0.0, "2": 4.0, "3": 2.0}
    assert samples[("dyce_relative_macs_count", ())] == 12
    assert samples[("dyce_relative_macs_sum", ())] == pytest.approx(2 * (3 * 0.05 + 2 * 0.6 + 1.0))
    assert samples[("dyce_relative_macs_bucket", (("le", "0.05"),))] == 6
    assert samples[("dyce_queue_duration_seconds_count", ())] == 4
