"""Savers (TinySaver) in the core: the saver stage leaves the backbone as it was, the executor,
the pipeline and ONNX Runtime agree with the offline simulation, the backbone really does not
run for the images a saver answers, and the searches reach brute force's optimum with a saver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dyce.artifacts import (
    ArtifactLayout,
    LoadedModel,
    backbone_identity,
    load_model,
    load_savers,
    save_backbone,
    save_exits,
    save_savers,
)
from dyce.backbones import build_backbone
from dyce.bank import Bank, BankEntry, BankMismatchError, ExitIdentity, SplitMetrics
from dyce.config import ExitConfiguration
from dyce.execution_backends import OnnxRuntimeBackend
from dyce.executor import EarlyExitExecutor
from dyce.macs import MacTable, count_macs, measure_macs
from dyce.pipeline import EarlyExitPipeline
from dyce.preprocess import FASHION_MNIST
from dyce.savers import attach_savers, build_saver, list_saver_kinds
from dyce.simulate import ExitRecords, exit_positions, simulate
from offline.export_onnx import export_onnx
from offline.objective import SearchProblem
from offline.search import baseline, iterative, single_pass
from tests.core_helpers import demo_parts, quantile_config, records_for
from tests.test_offline_search import (
    LAMBDAS,
    assert_iterative_stops_where_no_single_move_improves,
    assert_searches_reach_brute_force,
    config_of,
    objective,
    random_problem,
)

BATCH = 64
# cnn_small on a 1x28x28 image, by hand: 3x3 stride-2 convolutions 1->16 (14x14 out), 16->32
# (7x7), 32->64 (4x4), then a 64->10 linear read-out.
CNN_SMALL_MACS = 16 * 1 * 9 * 14 * 14 + 32 * 16 * 9 * 7 * 7 + 64 * 32 * 9 * 4 * 4 + 64 * 10


@pytest.fixture(scope="module")
def setup():
    backbone, exits, _ = demo_parts()
    torch.manual_seed(2)
    saver = build_saver("cnn_small", backbone.input_spec, backbone.num_classes).eval()
    staged, all_exits = attach_savers(backbone, exits, [saver], ["cnn_small"])
    macs = measure_macs(staged, all_exits)
    images = torch.randn(BATCH, 1, 28, 28)
    with torch.no_grad():
        labels = backbone(images).argmax(1)
    labels[::5] = (labels[::5] + 1) % 10  # some wrong answers, so accuracy is not trivially 1
    records = records_for(staged, all_exits, images, labels)
    configs = {
        "saver_half": quantile_config(records, {0: (1, 0.5), 3: (2, 0.6)}),
        "saver_all": quantile_config(records, {0: (1, 0.0)}),
        "no_saver": quantile_config(records, {2: (1, 0.5)}),
    }
    executor = EarlyExitExecutor(staged, all_exits, macs)
    return backbone, saver, executor, images, labels, records, configs


def saver_confidence(saver, images) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(saver(images), dim=1).max(dim=1).values


def test_the_saver_stage_leaves_the_backbone_as_it_was(setup):
    backbone, saver, executor, images, *_ = setup
    staged = executor.backbone
    assert staged.model is backbone.model and staged.num_positions == backbone.num_positions + 1
    with torch.no_grad():
        torch.testing.assert_close(staged(images), backbone(images), rtol=0, atol=0)
    plain = measure_macs(backbone)
    assert executor.macs.segment_macs == (0, *plain.segment_macs)
    assert executor.macs.exit_macs[0] == (CNN_SMALL_MACS,)
    assert executor.macs.total_macs == plain.total_macs  # relative MACs keep the plain model as 1


@pytest.mark.parametrize("name", ["saver_half", "saver_all", "no_saver"])
def test_executor_equals_the_offline_simulation_with_a_saver(setup, name):
    _, _, executor, images, labels, records, configs = setup
    config = configs[name]
    result = executor.run(images, config)
    np.testing.assert_array_equal(result.exit_positions.numpy(), exit_positions(records, config))
    sim = simulate(records, config, executor.macs)
    assert result.relative_macs.mean() == pytest.approx(sim.relative_macs)
    assert (result.probabilities.argmax(1) == labels).float().mean().item() == pytest.approx(sim.accuracy)


def test_the_backbone_never_runs_for_the_images_a_saver_answers(setup):
    backbone, saver, executor, images, _, _, configs = setup
    seen: list[int] = []
    # The backbone's first segment as the executor runs it (rewritten), behind the saver stage.
    hook = executor.backend.segments[1].register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    try:
        executor.run(images, configs["saver_all"])
        assert seen == []  # every image answered by the saver: not one backbone segment ran
        config = configs["saver_half"]
        executor.run(images, config)
        # Independent count: the saver run by hand, against the configuration's threshold.
        passed = int((saver_confidence(saver, images) < config.thresholds[0]).sum())
        assert 0 < passed < BATCH and sum(seen) == passed
    finally:
        hook.remove()


def test_pipeline_gives_the_executor_answers_with_a_saver(setup):
    _, _, executor, images, _, _, configs = setup
    reference = executor.run(images, configs["saver_half"])
    pipeline = EarlyExitPipeline(executor, batch_size=16)
    positions = torch.full((BATCH,), -1)
    probabilities = torch.zeros(BATCH, 10)
    for start in range(0, BATCH, 8):
        pipeline.push(images[start : start + 8], list(range(start, start + 8)), configs["saver_half"])
        while pipeline.has_full_batch():
            for out in pipeline.step():
                positions[out.tags], probabilities[out.tags] = out.position, out.probabilities
    while pipeline.waiting():
        for out in pipeline.step(flush=True):
            positions[out.tags], probabilities[out.tags] = out.position, out.probabilities
    assert torch.equal(positions, reference.exit_positions)
    torch.testing.assert_close(probabilities, reference.probabilities, rtol=1e-4, atol=1e-5)


def test_onnxruntime_runs_the_saver_stage_like_torch(setup, tmp_path):
    _, saver, executor, images, _, _, configs = setup
    config = configs["saver_half"]
    used = {(n, k) for n, k in enumerate(config.exits[:-1]) if k}
    manifest = export_onnx(executor.backbone, executor.exits, used, tmp_path)
    assert manifest.segments[0].file is None  # the saver stage is no graph: nothing runs there
    backend = OnnxRuntimeBackend(tmp_path, torch.device("cpu"))
    onnx = EarlyExitExecutor(executor.backbone, executor.exits, executor.macs, config=config, backend=backend)
    eager = executor.run(images, config)
    served = onnx.run(images)
    agree = (served.exit_positions == eager.exit_positions).float().mean().item()
    assert agree >= 0.95  # float noise between runtimes may move a sample sitting on a threshold
    same = served.exit_positions == eager.exit_positions
    torch.testing.assert_close(served.probabilities[same], eager.probabilities[same], rtol=1e-3, atol=1e-4)


def free_saver_stage(macs: MacTable) -> MacTable:
    """Position 0 becomes a saver stage: its segment (the identity) costs nothing."""
    return MacTable(segment_macs=(0, *macs.segment_macs[1:]), head_macs=macs.head_macs, exit_macs=macs.exit_macs)


@pytest.mark.parametrize("seed", range(4))
def test_searches_reach_the_brute_force_optimum_choosing_among_savers(seed):
    """Three candidate savers in front of the backbone: which one, and its threshold, as brute
    force over every saver and every recorded threshold finds them."""
    records, macs = random_problem(seed, positions=2, kinds=3, samples=15)
    assert_searches_reach_brute_force(records, free_saver_stage(macs))


@pytest.mark.parametrize("seed", range(3))
def test_iterative_with_a_saver_stops_where_no_single_move_improves(seed):
    records, macs = random_problem(seed, positions=4, kinds=2, samples=14)
    assert_iterative_stops_where_no_single_move_improves(records, free_saver_stage(macs))


@pytest.mark.parametrize("seed", range(3))
def test_baseline_with_a_saver_is_the_best_shared_type_and_threshold(seed):
    """One saver in front, two exit types behind: under either type the saver takes part, at the
    shared threshold; brute force over every type and every recorded threshold agrees."""
    records, macs = random_problem(seed, positions=4, kinds=2, samples=14)
    confidence, correct = records.confidence.copy(), records.correct.copy()
    confidence[0, 1], correct[0, 1] = np.nan, False  # the saver stage has one candidate
    records = ExitRecords(confidence, correct, (1, 2, 2, 1))
    costs = free_saver_stage(macs)
    shared = [ExitConfiguration.final_only(4)]
    for k in (1, 2):
        levels = np.unique(np.concatenate([confidence[0, 0], confidence[1:3, k - 1].ravel()]))
        shared += [config_of([(1, float(t)), (k, float(t)), (k, float(t))]) for t in levels]
    for lam, config in baseline(SearchProblem(records, costs), LAMBDAS).items():
        best = min(objective(records, costs, lam, c) for c in shared)
        assert objective(records, costs, lam, config) == pytest.approx(best, abs=1e-12)


def test_a_saver_right_on_the_easy_half_is_used_there_and_only_there():
    """Hand-made: the saver is right and confident (0.9) on the easy half and unsure (0.5)
    elsewhere; the backbone is right everywhere. Cheap and lossless: saver 1 at t = 0.9."""
    m = 8
    confidence = np.full((2, 1, m), 0.5, dtype=np.float32)
    correct = np.zeros((2, 1, m), dtype=bool)
    confidence[0, 0, :4], correct[0, 0, :4] = 0.9, True
    confidence[1, 0], correct[1, 0] = 1.0, True
    records = ExitRecords(confidence, correct, (1, 1))
    macs = MacTable(segment_macs=(0, 98), head_macs=2, exit_macs=((3,), ()))
    optimum = ExitConfiguration(exits=(1, 1), thresholds=(float(np.float32(0.9)), 0.0))
    problem = SearchProblem(records, macs)
    for lam in (0.5, 0.9, 0.99):
        assert single_pass(problem, [lam])[lam] == optimum
        assert iterative(problem, [lam])[lam] == optimum
    # Half the images pay 3 %, the other half 3 % + the whole backbone: (0.03 + 1.03) / 2.
    assert simulate(records, optimum, macs).relative_macs == pytest.approx(0.53)


def _bank(records, macs, savers, exits, backbone) -> Bank:
    config = quantile_config(records, {0: (1, 0.5)})
    result = simulate(records, config, macs)
    metrics = SplitMetrics(
        accuracy=result.accuracy,
        relative_accuracy=result.relative_accuracy,
        relative_macs=result.relative_macs,
        exit_rates=tuple(result.exit_rates.tolist()),
    )
    return Bank(
        backbone=backbone,
        exits=tuple(exits),
        num_candidates=records.num_candidates,
        macs=macs,
        original_accuracy={"search": records.original_accuracy},
        entries=(BankEntry(lam=0.5, algorithm="hand-made", config=config, search=metrics),),
        savers=tuple(savers),
    )


def test_savers_round_trip_and_a_bank_needs_the_savers_it_was_searched_with(setup, tmp_path):
    backbone, saver, executor, _, _, records, _ = setup
    layout = ArtifactLayout(tmp_path)
    backbone_manifest = save_backbone(layout, backbone, [str(i) for i in range(10)], FASHION_MNIST)
    exit_manifest = save_exits(layout, demo_parts()[1], backbone_identity(backbone))  # the fixture's exits
    saver_manifest = save_savers(layout, [saver], ["cnn_small"], backbone_manifest.identity)
    (loaded,), _ = load_savers(layout, backbone)
    images = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(loaded(images), saver(images), rtol=0, atol=0)

    model = load_model(layout)
    assert isinstance(model, LoadedModel) and model.saver_stage
    assert model.exits.num_candidates == executor.exits.num_candidates
    identities = (exit_manifest.identities(), backbone_manifest.identity)
    bank = _bank(records, executor.macs, saver_manifest.identities(), *identities)
    model.check_bank(bank)
    other = ExitIdentity(position=0, index=1, kind="cnn_small", sha256="0" * 64)
    with pytest.raises(BankMismatchError, match="saver"):
        bank.check_matches(backbone_manifest.identity, exit_manifest.identities(), [other])
    with pytest.raises(BankMismatchError, match="needs saver cnn_small"):
        load_model(layout, savers=False).check_bank(bank)
    plain = bank.model_copy(
        update={"savers": (), "num_candidates": bank.num_candidates[1:], "entries": (), "macs": measure_macs(backbone)}
    )
    with pytest.raises(BankMismatchError, match="searched without a saver stage"):
        model.check_bank(plain)

    tensors = load_file(str(layout.savers_weights))
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(layout.savers_weights))
    with pytest.raises(ValueError, match="manifest hash"):
        load_savers(layout, backbone)


def test_an_all_saver_configuration_is_valid_and_cheap(setup):
    _, _, executor, images, _, _, configs = setup
    config = configs["saver_all"]
    assert config == ExitConfiguration(
        exits=(1,) + (0,) * 7 + (1,), thresholds=(config.thresholds[0],) + (1.0,) * 7 + (0.0,)
    )
    result = executor.run(images, config)
    assert (result.exit_positions == 0).all()
    assert result.relative_macs == pytest.approx(np.full(BATCH, CNN_SMALL_MACS / executor.macs.total_macs))


@pytest.mark.parametrize("kind", list_saver_kinds())
@pytest.mark.parametrize("name", ["resnet18_fmnist", "resnet18"])
def test_every_saver_kind_fits_the_input_and_costs_under_a_tenth_of_the_backbone(kind, name):
    """The issue's budget: each saver well under 10 % of the backbone's MACs, on the demo's 28x28
    grey images and on ImageNet-sized colour ones."""
    backbone = build_backbone(name)
    saver = build_saver(kind, backbone.input_spec, backbone.num_classes).eval()
    image = torch.zeros(2, *backbone.input_spec.shape)
    with torch.no_grad():
        assert saver(image).shape == (2, backbone.num_classes)
    assert count_macs(saver, image[:1]) < 0.1 * measure_macs(backbone).total_macs
