"""ONNX Runtime backend parity: the same early-exit answers as eager PyTorch."""

import numpy as np
import pytest
import torch

from dyce.artifacts import backbone_identity
from dyce.backbones import build_backbone
from dyce.config import ExitConfiguration
from dyce.execution_backends import OnnxRuntimeBackend
from dyce.executor import EarlyExitExecutor
from dyce.exits import ExitSet
from dyce.hashing import state_dict_sha256
from dyce.macs import measure_macs
from dyce.recording import record_batch
from offline.export_onnx import export_onnx

FAMILIES = ["resnet18", "convnext_tiny", "mobilenet_v3_small", "efficientnet_b0", "resnet18_fmnist"]


def robust_threshold(confidence: np.ndarray, quantile: float) -> float:
    """A threshold in the middle of the widest gap near ``quantile``, so float noise between
    runtimes (~1e-6) cannot move a sample across it."""
    values = np.sort(confidence)
    i = int(quantile * (len(values) - 1))
    window = range(max(1, i - 2), min(len(values), i + 3))
    j = max(window, key=lambda j: values[j] - values[j - 1])
    return float((values[j] + values[j - 1]) / 2)


@pytest.mark.parametrize("name", FAMILIES)
def test_onnxruntime_matches_torch_for_every_family(name, tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone(name)
    n_positions = backbone.num_positions
    chosen = sorted({1, n_positions // 3, (2 * n_positions) // 3} - {n_positions - 1})
    exits = ExitSet.build(
        [s[0] for s in backbone.position_shapes()], backbone.num_classes, ("mlp1", "mlp3x500"), positions=chosen
    )
    macs = measure_macs(backbone, exits)
    images = torch.randn(12, *backbone.input_spec.shape)
    confidence, _ = record_batch(backbone, exits, images)
    exit_choice, thresholds = [0] * n_positions, [1.0] * n_positions
    for i, n in enumerate(chosen):
        k = 1 + i % 2
        exit_choice[n] = k
        thresholds[n] = robust_threshold(confidence[n, k - 1].numpy(), 0.6)
    exit_choice[-1], thresholds[-1] = 1, 0.0
    config = ExitConfiguration(exits=tuple(exit_choice), thresholds=tuple(thresholds))

    manifest = export_onnx(backbone, exits, {(n, config.exits[n]) for n in chosen}, tmp_path)
    ort_backend = OnnxRuntimeBackend(tmp_path, torch.device("cpu"))
    ort_backend.check_matches(
        backbone_identity(backbone),
        {(s.position, s.index): state_dict_sha256(exits.exit(s.position, s.index)) for s in exits.all_specs()},
    )
    assert manifest.opset >= 17

    eager = EarlyExitExecutor(backbone, exits, macs, config=config)
    onnx = EarlyExitExecutor(backbone, exits, macs, config=config, backend=ort_backend)
    for batch in (images, images[:1]):
        expected, got = eager.run(batch), onnx.run(batch)
        assert torch.equal(got.exit_positions, expected.exit_positions)
        assert (got.probabilities - expected.probabilities).abs().max().item() <= 1e-4
    # The configuration really exercised early exits, not only the final head.
    assert len(set(eager.run(images).exit_positions.tolist())) > 1


def test_graphs_from_other_weights_are_refused(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18_fmnist")
    exits = ExitSet.build([s[0] for s in backbone.position_shapes()], 10, ("mlp1",), positions=[2])
    export_onnx(backbone, exits, {(2, 1)}, tmp_path)
    ort_backend = OnnxRuntimeBackend(tmp_path, torch.device("cpu"))
    other = build_backbone("resnet18_fmnist")  # fresh random weights
    with pytest.raises(ValueError, match="another backbone"):
        ort_backend.check_matches(backbone_identity(other), {(2, 1): state_dict_sha256(exits.exit(2, 1))})
    with pytest.raises(ValueError, match="other weights"):
        ort_backend.check_matches(backbone_identity(backbone), {(2, 1): "0" * 64})
