import pytest
import torch

from dyce.backbones import build_backbone, list_backbones

EXPECTED_POSITIONS = {
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet101": 33,
    "resnet152": 50,
    "convnext_tiny": 18,
    "convnext_small": 36,
    "convnext_base": 36,
    "mobilenet_v3_large": 17,
    "mobilenet_v3_small": 13,
    "efficientnet_b0": 9,
    "resnet18_fmnist": 8,
}


def test_registry_lists_every_family():
    assert set(EXPECTED_POSITIONS) <= set(list_backbones())


@pytest.mark.parametrize("name", sorted(EXPECTED_POSITIONS))
def test_segments_and_head_reproduce_the_torchvision_model(name):
    torch.manual_seed(0)
    backbone = build_backbone(name)
    assert not backbone.training
    assert backbone.num_positions == EXPECTED_POSITIONS[name]
    channels, height, width = backbone.input_spec.shape
    # Smaller than 224 keeps the test fast; every family is fully convolutional up to its pooling.
    size = min(height, 64)
    x = torch.randn(2, channels, size, size)
    with torch.no_grad():
        expected = backbone.model(x)
        composed = x
        for segment in backbone.segments:
            composed = segment(composed)
        composed = backbone.head(composed)
    torch.testing.assert_close(composed, expected, rtol=1e-4, atol=1e-5)
    # The segments are the torchvision model's own modules, not copies.
    model_params = {id(p) for p in backbone.model.parameters()}
    assert {id(p) for p in backbone.segments.parameters()} | {id(p) for p in backbone.head.parameters()} == model_params


def test_local_state_dict_file_and_num_classes(tmp_path):
    torch.manual_seed(1)
    original = build_backbone("resnet18", num_classes=7)
    path = tmp_path / "weights.pth"
    torch.save(original.model.state_dict(), path)
    loaded = build_backbone("resnet18", weights=str(path))
    assert loaded.num_classes == 7
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), original(x))


def test_torchvision_weights_api_is_used(monkeypatch):
    """No weights can be downloaded here, so prove that the builder hands the weights argument to
    torchvision's own API (which would download and verify it) rather than ignoring it."""
    from torchvision.models import ResNet50_Weights
    from torchvision.models._api import WeightsEnum

    fetched = []

    def fake_get_state_dict(self, *args, **kwargs):
        fetched.append(self)
        raise ConnectionError("offline")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", fake_get_state_dict)
    with pytest.raises(ConnectionError):
        build_backbone("resnet50", weights="DEFAULT")
    assert fetched == [ResNet50_Weights.IMAGENET1K_V2]


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown backbone"):
        build_backbone("resnet9000")


def test_demo_variant_takes_grey_28x28():
    backbone = build_backbone("resnet18_fmnist")
    assert backbone.input_spec.shape == (1, 28, 28)
    assert backbone.num_classes == 10
    with torch.no_grad():
        assert backbone(torch.randn(3, 1, 28, 28)).shape == (3, 10)
