"""End to end on a small subset of the real Fashion-MNIST: the `dyce-offline build` CLI, then
what each step left behind (records format, bank vs artefacts, report), and the frozen backbone."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from dyce.artifacts import load_backbone, load_bank_for, load_exits
from dyce.exits import ExitSet, register_exit_kind
from dyce.hashing import state_dict_sha256
from dyce.numerics import choose_numerics
from dyce.simulate import simulate
from offline.cli import app
from offline.data import load_split, read_idx
from offline.layout import OfflineLayout
from offline.records import load_records
from offline.train_backbone import evaluate, frozen
from offline.train_exits import ExitRecipe, pooled_features, train_exits, train_on_maps, train_on_pooled

SUBSET = 1200
# Every step of the demo build, in the order it runs them (written out: the build must not lose one).
BUILD_STEPS = ("data", "train-backbone", "train-exits", "train-saver", "record", "search", "report")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> OfflineLayout:
    root = tmp_path_factory.mktemp("artifacts")
    result = CliRunner().invoke(app, ["--artifacts", str(root), "build", "--subset", str(SUBSET)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ran"] == list(BUILD_STEPS)
    return OfflineLayout(root)


def test_idx_reader_reads_the_real_files():
    images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    labels = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,) and set(np.unique(labels)) == set(range(10))


def test_splits_are_disjoint_and_seeded(built):
    splits = np.load(built.splits)
    assert not set(splits["exit_train"]) & set(splits["search"])
    assert len(splits["exit_train"]) == SUBSET and len(splits["search"]) == len(splits["test"]) == SUBSET // 2


def test_build_is_restartable(built):
    result = CliRunner().invoke(app, ["--artifacts", str(built.root), "build", "--subset", str(SUBSET)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output.strip().splitlines()[-1])["ran"] == []


def _copy(built: OfflineLayout, tmp_path) -> OfflineLayout:
    shutil.copytree(built.root, tmp_path / "artifacts")
    return OfflineLayout(tmp_path / "artifacts")


def _build(layout: OfflineLayout) -> tuple[list[str], str]:
    result = CliRunner().invoke(app, ["--artifacts", str(layout.root), "build", "--subset", str(SUBSET)])
    assert result.exit_code == 0, result.output
    # rich wraps long lines at the terminal width: compare the words
    return json.loads(result.output.strip().splitlines()[-1])["ran"], " ".join(result.output.split())


def test_a_backbone_retrained_by_hand_makes_every_later_step_rerun(built, tmp_path):
    """The issue's failure: `train-backbone` with other settings, then `build`. The hand-made
    backbone stays (made on purpose), everything made from the old one reruns, and the bank
    then matches the artefacts the service loads."""
    layout = _copy(built, tmp_path)
    old_weights = load_backbone(layout)[1].identity.weights_sha256
    args = ["--artifacts", str(layout.root), "train-backbone", "--epochs", "1", "--seed", "7", "--batch-size", "64"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    new_weights = load_backbone(layout)[1].identity.weights_sha256
    assert new_weights != old_weights
    ran, output = _build(layout)
    assert ran == ["train-exits", "train-saver", "record", "search", "report"]
    assert "backbone changed" in output and "kept: made by `dyce-offline train-backbone`" in output
    bank = load_bank_for(layout)  # raises BankMismatchError if anything is left from the old backbone
    assert bank.backbone.weights_sha256 == new_weights
    assert load_records(layout)[0].backbone.weights_sha256 == new_weights
    assert _build(layout)[0] == []


def test_staleness_is_by_content_not_by_file_dates(built, tmp_path):
    """Rewriting files with the same content reruns nothing; a changed bank reruns the report only."""
    layout = _copy(built, tmp_path)
    with np.load(layout.splits) as splits:
        arrays = {name: splits[name] for name in splits.files}
    np.savez(layout.splits, **arrays)  # new zip entries, new dates, same arrays
    layout.bank.write_text(layout.bank.read_text())
    assert _build(layout)[0] == []

    bank = json.loads(layout.bank.read_text())
    bank["entries"] = bank["entries"][:-1]
    layout.bank.write_text(json.dumps(bank))
    ran, output = _build(layout)
    assert ran == ["report"] and "bank changed" in output
    assert json.loads(layout.report_json.read_text())["entries"] == len(bank["entries"])


def test_a_build_with_another_recipe_reruns_the_steps_it_made(built, tmp_path):
    """Steps the build itself made rerun when its recipe changes (here the search grid only)."""
    from offline.build import build, demo_options

    layout = _copy(built, tmp_path)
    ran = build(layout, demo_options(SUBSET).model_copy(update={"grid": "adaptive"}))
    assert ran == ["search", "report"]
    runs = json.loads(layout.search_runs.read_text())
    assert {r["grid"] for r in runs if r["algorithm"] != "baseline"} == {"adaptive"}


def test_records_round_trip_and_agree_with_the_backbone(built):
    manifest, records = load_records(built)
    backbone, backbone_manifest = load_backbone(built)
    exits, _ = load_exits(built)
    assert manifest.backbone == backbone_manifest.identity
    # The demo build trains one saver: a saver stage with one candidate in front of the backbone.
    assert manifest.num_candidates == (1, *exits.num_candidates)
    assert [s.kind for s in manifest.savers] == ["cnn_small"]
    test = records["test"]
    assert test.confidence.shape == (backbone.num_positions + 1, 2, SUBSET // 2)
    assert np.isnan(test.confidence[0, 1]).all()  # padding: the saver stage has one candidate
    early = test.confidence[:-1][~np.isnan(test.confidence[:-1])]
    assert np.all((early >= 0.1 - 1e-6) & (early <= 1.0))  # max softmax of 10 classes
    accuracy = evaluate(backbone.model, load_split(built, "test", backbone_manifest.preprocess))
    assert test.original_accuracy == pytest.approx(accuracy)
    with np.load(built.records) as data:
        labels = data["test_labels"]
        assert np.array_equal(data["test_correct"], data["test_prediction"] == labels[None, None, :])


def test_bank_matches_artefacts_and_simulation(built):
    bank = load_bank_for(built)
    _, records = load_records(built)
    assert {e.algorithm for e in bank.entries} == {"iterative", "single_pass", "baseline"}
    assert bank.frontier()
    for entry in bank.entries[::17]:
        result = simulate(records["test"], entry.config, bank.macs)
        assert entry.test.accuracy == result.accuracy and entry.test.relative_macs == result.relative_macs
    assert built.report_png.read_bytes()[:4] == b"\x89PNG"


def test_report_chooses_on_search_and_measures_on_test(built):
    """The honest figure: for each drop, the cheapest configuration within it on the SEARCH
    split, then that configuration simulated on the test records; the flattering figure (the
    cheapest within the drop on the test split itself) is kept under its own name."""
    bank = load_bank_for(built)
    _, records = load_records(built)
    report = json.loads(built.report_json.read_text())
    original = {split: float(r.correct[-1, 0].mean()) for split, r in records.items()}
    for drop in ("0.5", "2", "5"):
        # Brute force over the bank, from the records (not the bank's stored figures).
        scored = [(e, simulate(records["search"], e.config, bank.macs)) for e in bank.entries]
        within = [(e, r) for e, r in scored if r.accuracy >= original["search"] * (1 - float(drop) / 100) - 1e-12]
        entry, on_search = min(within, key=lambda er: (er[1].relative_macs, -er[1].accuracy))
        on_test = simulate(records["test"], entry.config, bank.macs)
        chosen = report["test_at_drop_chosen_on_search"][drop]
        assert chosen["search_rel_macs"] == pytest.approx(on_search.relative_macs)
        assert chosen["test_rel_macs"] == pytest.approx(on_test.relative_macs)
        assert chosen["test_drop_percent"] == pytest.approx(100 * (1 - on_test.accuracy / original["test"]))
        on_test_all = [simulate(records["test"], e.config, bank.macs) for e in bank.entries]
        cheapest_on_test = min(
            r.relative_macs for r in on_test_all if r.accuracy >= original["test"] * (1 - float(drop) / 100) - 1e-12
        )
        assert report["test_rel_macs_at_drop_chosen_on_test"][drop] == pytest.approx(cheapest_on_test)
    assert "test_rel_macs_at_drop" not in report  # the old, ambiguous name
    # The build's own figures: every step's time and the numerics each training step chose.
    assert set(report["build"]["step_seconds"]) == set(BUILD_STEPS)
    native = choose_numerics("auto", "cpu").precision
    assert {s: n["precision"] for s, n in report["numerics"].items()} == {
        "train-backbone": native,
        "train-exits": native,
        "train-saver": native,
    }
    markdown = built.report_md.read_text()
    assert "Chosen on the search split, measured on the test split" in markdown and "chosen on test" in markdown


class ConvExit(nn.Module):
    """An exit that needs the full feature map (not global-average-pooled first)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 8, 1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).amax(dim=(2, 3)))


def test_exit_training_leaves_the_backbone_untouched(built, tmp_path):
    """Both paths (pooled-feature cache and full maps) train their exits; the backbone's
    state_dict hash is identical before and after."""
    try:
        register_exit_kind("test_conv", ConvExit)
    except ValueError:
        pass  # registered by an earlier test in this process
    layout = OfflineLayout(tmp_path)
    for path in (built.data_manifest, built.backbone_manifest, built.backbone_weights):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    np.savez(layout.splits, **{k: v[:200] for k, v in np.load(built.splits).items()})
    backbone, manifest = load_backbone(layout)
    before = state_dict_sha256(backbone.model)
    recipe = ExitRecipe(kinds=("mlp1", "test_conv"), epochs=1, batch_size=50)

    exits = ExitSet.build([s[0] for s in backbone.position_shapes()], 10, recipe.kinds)
    initial = {(s.position, s.index): state_dict_sha256(exits.exit(s.position, s.index)) for s in exits.all_specs()}
    dataset = load_split(layout, "exit_train", manifest.preprocess)
    pooled, teacher, labels = pooled_features(frozen(backbone), dataset, range(backbone.num_positions - 1))
    train_on_pooled(exits, pooled, teacher, labels, recipe, torch.Generator().manual_seed(0))
    train_on_maps(backbone, exits, dataset, recipe, torch.Generator().manual_seed(0))
    for spec in exits.all_specs():
        assert state_dict_sha256(exits.exit(spec.position, spec.index)) != initial[(spec.position, spec.index)]
    assert state_dict_sha256(backbone.model) == before

    report = train_exits(layout, recipe)
    assert report.backbone_sha256 == before == state_dict_sha256(load_backbone(layout)[0].model)


def test_latency_costed_search_uses_the_measured_profile(built, tmp_path):
    """`profile` then `search --cost latency`: the bank's trade-off is on measured time, each
    entry's relative time is its samples' path times (hand computation from the profile's table),
    and a later build keeps the user's bank."""
    from dyce.profile import LatencyProfile

    layout = _copy(built, tmp_path)
    root = str(layout.root)
    profiled = CliRunner().invoke(app, ["--artifacts", root, "profile", "--device", "cpu", "--max-batch", "4"])
    assert profiled.exit_code == 0, profiled.output
    profile = LatencyProfile.model_validate_json(layout.profile.read_text())
    assert profile.buckets == (1, 2, 4) and profile.where.device_type == "cpu"
    assert profile.where.segment_rewrites is True  # timed as dyce-serve runs them by default
    searched = CliRunner().invoke(
        app, ["--artifacts", root, "search", "--cost", "latency", "--batch", "4", "--algorithms", "single_pass"]
    )
    assert searched.exit_code == 0, searched.output
    bank = load_bank_for(layout)
    table = profile.cost_table(4)
    assert bank.cost.kind == "latency" and bank.cost.table == table and bank.cost.where == profile.where
    manifest, records = load_records(layout)
    for entry in bank.entries:
        config = entry.config
        step = [
            table.segment_macs[n]
            + (table.head_macs if n == len(config.exits) - 1 else table.exit_macs[n][k - 1] if k else 0)
            for n, k in enumerate(config.exits)
        ]
        result = simulate(records["search"], config, manifest.macs)
        expected = np.cumsum(step)[result.exit_positions].mean() / (sum(table.segment_macs) + table.head_macs)
        assert entry.search.relative_latency == pytest.approx(expected)
        assert entry.search.relative_macs == pytest.approx(result.relative_macs)
    frontier = [bank.entries[i].search for i in bank.frontier()]
    assert [s.relative_latency for s in frontier] == sorted(s.relative_latency for s in frontier)
    ran, _ = _build(layout)
    assert "search" not in ran


def test_the_saver_is_recorded_searched_and_reported_with_and_without(built):
    """The saver's records are what the saver itself says (run here directly on the test split);
    the bank searched without the saver stage behaves, saver disabled, exactly like on the full
    records; the report's saver figures are those of the saver and of the chosen entries."""
    from dyce.artifacts import load_savers
    from dyce.bank import Bank

    backbone, backbone_manifest = load_backbone(built)
    (saver,), saver_manifest = load_savers(built, backbone)
    _, records = load_records(built)
    dataset = load_split(built, "test", backbone_manifest.preprocess)
    images, labels = dataset.tensors
    with torch.no_grad():
        probabilities = torch.softmax(saver(images), dim=1)
    confidence, prediction = probabilities.max(dim=1)
    np.testing.assert_allclose(records["test"].confidence[0, 0], confidence.numpy(), rtol=1e-5, atol=1e-6)
    assert np.array_equal(records["test"].correct[0, 0], (prediction == labels).numpy())

    bank = load_bank_for(built)
    assert bank.saver_stage and bank.savers[0].sha256 == saver_manifest.savers[0].sha256
    plain = Bank.load(built.bank_without_saver)
    assert not plain.saver_stage and plain.num_positions == backbone.num_positions
    for entry in plain.entries[::7]:
        disabled = entry.config.model_copy(
            update={"exits": (0, *entry.config.exits), "thresholds": (1.0, *entry.config.thresholds)}
        )
        on_full_records = simulate(records["test"], disabled, bank.macs)
        assert entry.test.accuracy == on_full_records.accuracy
        assert entry.test.relative_macs == pytest.approx(on_full_records.relative_macs)
        assert on_full_records.exit_counts[0] == 0

    report = json.loads(built.report_json.read_text())
    (candidate,) = report["saver"]["candidates"]
    assert candidate["accuracy"]["test"] == pytest.approx((prediction == labels).float().mean().item())
    assert candidate["relative_macs"] < 0.1  # the budget: well under 10% of the backbone
    by_id = {e.config_id: e for e in bank.entries}
    for drop, chosen in report["test_at_drop_chosen_on_search"].items():
        share = simulate(records["test"], by_id[chosen["config_id"]].config, bank.macs).exit_rates[0]
        assert report["saver"]["test_share_answered_at_drop_chosen_on_search"][drop] == pytest.approx(share)
    assert set(report["without_saver"]["test_at_drop_chosen_on_search"]) == {"0.5", "2", "5"}


def test_the_service_answers_with_the_saver_and_counts_it(built, fmnist_test_images):
    """Served at the tier chosen on search for <= 0.5 % drop: exactly the images whose saver
    confidence (the saver run here by hand) reaches the tier's threshold are answered at
    position -1, the backbone's cost is not charged for them, and /metrics counts them as "saver"."""
    import httpx
    from PIL import Image

    from dyce.artifacts import load_savers
    from dyce.preprocess import FASHION_MNIST
    from tests.conftest import LiveServer, metric_sum, png_bytes, scrape, service_settings

    bank = load_bank_for(built)
    report = json.loads(built.report_json.read_text())
    chosen_id = report["test_at_drop_chosen_on_search"]["0.5"]["config_id"]
    index = next(i for i, e in enumerate(bank.entries) if e.config_id == chosen_id)
    config = bank.entries[index].config
    assert config.exits[0] == 1, "the demo's saver must earn a place in the <= 0.5 % tier"
    images = fmnist_test_images[0][:60]
    (saver,), _ = load_savers(built, load_backbone(built)[0])
    with torch.no_grad():
        tensors = torch.stack([FASHION_MNIST.transform()(Image.fromarray(image)) for image in images])
        confidence = torch.softmax(saver(tensors), dim=1).max(dim=1).values
    answered_by_saver = (confidence >= config.thresholds[0]).numpy()
    assert 0 < answered_by_saver.sum() < len(images)

    with LiveServer(service_settings(built.root, autoswitch="manual", slo_p95_ms=60_000)) as server:
        switched = httpx.post(f"{server.url}/admin/active", json={"index": index}, headers=server.admin(), timeout=30)
        assert switched.status_code == 200, switched.text
        before = metric_sum(scrape(server.url), "dyce_exits_total", position="saver")
        positions, costs = [], []
        for image in images:
            files = {"file": ("x.png", png_bytes(image), "image/png")}
            body = httpx.post(f"{server.url}/v1/classify", files=files, timeout=30).json()
            positions.append(body["exit_position"])
            costs.append(body["relative_macs"])
        after = metric_sum(scrape(server.url), "dyce_exits_total", position="saver")
        admin = httpx.get(f"{server.url}/admin/bank", headers=server.admin(), timeout=30).json()
    positions = np.array(positions)
    assert np.array_equal(positions == -1, answered_by_saver)
    saver_cost = bank.macs.exit_macs[0][0] / bank.macs.total_macs
    assert np.allclose(np.array(costs)[positions == -1], saver_cost)
    assert after - before == answered_by_saver.sum()
    assert [s["kind"] for s in admin["savers"]] == ["cnn_small"]
    assert admin["entries"][index]["expected_saver_share"] == pytest.approx(bank.entries[index].search.exit_rates[0])
