import numpy as np
import pytest
import torch
from torchvision.models.vgg import cfgs, make_layers

from clipsr.clip import TINY_ARCH, ClipEncoder
from clipsr.digest import tensors_sha256
from clipsr.losses import (
    CompositeLoss,
    LossWeights,
    PerceptualLoss,
    pixel_loss,
    semantic_consistency_loss,
    vgg_layer_names,
)

SHALLOW = {"relu1_2": 1.0, "relu2_2": 0.5}


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """The first two VGG19 blocks with random weights, keyed like a full torchvision model."""
    torch.manual_seed(0)
    features = make_layers(cfgs["E"])[:10]
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    path = tmp_path_factory.mktemp("vgg") / "vgg19-shallow.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture(scope="module")
def encoder():
    return ClipEncoder.load(TINY_ARCH, seed=0)


def _pair(seed=0, shape=(2, 3, 32, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def test_pixel_loss_is_l1_and_checks_shapes():
    sr = torch.zeros(1, 3, 2, 2)
    hr = torch.tensor([0.0, 0.5, 1.0, 0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert pixel_loss(sr, hr).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="same shape"):
        pixel_loss(sr, torch.zeros(1, 3, 4, 4))


def test_vgg_layer_names_follow_torchvision_indices():
    names = vgg_layer_names("vgg19")
    assert len(names) == len(make_layers(cfgs["E"]))
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert names.index("conv5_4") == 34


def test_perceptual_loss_from_file_and_uri(vgg_file):
    path, state = vgg_file
    loss = PerceptualLoss.from_weights(str(path), layers=SHALLOW)
    assert loss.identity["sha256"] == tensors_sha256(state)
    assert loss.identity["weights"] == "file:vgg19-shallow.pth" and loss.identity["layers"] == SHALLOW
    assert len(loss.features) == 9  # only up to relu2_2 is built
    via_uri = PerceptualLoss.from_weights(path.as_uri(), layers=SHALLOW)
    assert via_uri.identity["sha256"] == loss.identity["sha256"]

    sr, hr = _pair()
    assert loss(hr, hr).item() == 0.0
    assert loss(sr, hr).item() > 0.0
    torch.testing.assert_close(via_uri(sr, hr), loss(sr, hr))
    assert loss(sr[:, :1], hr[:, :1]).item() > 0.0  # greyscale batches work too


def test_perceptual_loss_gradient_reaches_sr_only_and_network_stays_frozen(vgg_file):
    loss = PerceptualLoss.from_weights(str(vgg_file[0]), layers=SHALLOW)
    CompositeLoss({"pixel": 1.0, "perceptual": 0.1}, perceptual=loss).train()
    assert not loss.features.training
    sr, hr = _pair()
    sr.requires_grad_(True)
    hr.requires_grad_(True)
    loss(sr, hr).backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert hr.grad is None
    assert all(p.grad is None for p in loss.parameters())


def test_perceptual_loss_rejects_bad_layers_and_incomplete_weights(vgg_file):
    with pytest.raises(ValueError, match="unknown vgg19 layers"):
        PerceptualLoss.from_weights(str(vgg_file[0]), layers={"relu9_9": 1.0})
    with pytest.raises(ValueError, match="not a torchvision vgg19"):
        PerceptualLoss.from_weights(str(vgg_file[0]), layers={"relu3_1": 1.0})  # deeper than the file
    with pytest.raises(FileNotFoundError):
        PerceptualLoss.from_weights("/nonexistent/vgg19.pth", layers=SHALLOW)


def test_semantic_loss_zero_for_identical_and_positive_otherwise(encoder):
    sr, hr = _pair()
    assert abs(semantic_consistency_loss(encoder, hr, hr).item()) < 1e-6
    assert semantic_consistency_loss(encoder, sr, hr).item() > 0.0


def test_semantic_loss_gradient_reaches_sr_only(encoder):
    sr, hr = _pair()
    sr.requires_grad_(True)
    hr.requires_grad_(True)
    semantic_consistency_loss(encoder, sr, hr).backward()
    assert sr.grad is not None and sr.grad.abs().sum() > 0
    assert hr.grad is None


def test_semantic_loss_with_cached_hr_embedding_skips_the_hr_forward(encoder):
    sr, hr = _pair()
    expected = semantic_consistency_loss(encoder, sr, hr)
    cached = encoder.embed_images([img.permute(1, 2, 0).numpy() for img in hr])
    calls = []
    handle = encoder.visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        value = semantic_consistency_loss(encoder, sr, None, hr_embedding=cached)
    finally:
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(value, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="shape"):
        semantic_consistency_loss(encoder, sr, None, hr_embedding=np.zeros((3, 512), np.float32))


def test_composite_loss_defaults_to_pixel_only():
    sr, hr = _pair()
    total, logged = CompositeLoss()(sr, hr)
    assert set(logged) == {"pixel", "total"}
    assert total.item() == pytest.approx(pixel_loss(sr, hr).item())
    assert logged["total"] == pytest.approx(logged["pixel"])


def test_composite_loss_weights_all_terms(vgg_file, encoder):
    perceptual = PerceptualLoss.from_weights(str(vgg_file[0]), layers=SHALLOW)
    weights = LossWeights(pixel=1.0, perceptual=0.5, semantic=0.25)
    sr, hr = _pair()
    total, logged = CompositeLoss(weights, perceptual=perceptual, encoder=encoder)(sr, hr)
    expected = logged["pixel"] + 0.5 * logged["perceptual"] + 0.25 * logged["semantic"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert logged["total"] == pytest.approx(expected, rel=1e-5)


def test_composite_loss_weight_validation(vgg_file, encoder):
    with pytest.raises(ValueError, match="no perceptual network"):
        CompositeLoss({"perceptual": 0.1})
    with pytest.raises(ValueError, match="no CLIP encoder"):
        CompositeLoss(LossWeights(semantic=0.1))
    with pytest.raises(ValueError, match="unknown loss terms"):
        CompositeLoss({"pixle": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        LossWeights(pixel=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        LossWeights(pixel=0.0)
    # a network without a weight is simply unused
    perceptual = PerceptualLoss.from_weights(str(vgg_file[0]), layers=SHALLOW)
    _, logged = CompositeLoss({"pixel": 1.0}, perceptual=perceptual, encoder=encoder)(*_pair())
    assert set(logged) == {"pixel", "total"}
