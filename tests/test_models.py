"""The CDASR network: every backbone and scale trains and runs, with and without a CLIP vector."""
import pytest
import torch

from clipsr.factory import create_model, get_model_config, list_models
from clipsr.models.cdasr import count_parameters
from clipsr.models.upsampler import SCALES


@pytest.mark.parametrize("arch", ["cdasr-lite", "cdasr-base"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("with_clip", [False, True])
def test_forward_backward_every_backbone_and_scale(arch, scale, with_clip):
    torch.manual_seed(0)
    model = create_model(arch, scale)
    lr = torch.rand(2, 3, 12, 10)
    emb = torch.nn.functional.normalize(torch.randn(2, 512), dim=1) if with_clip else None
    sr = model(lr, emb)
    assert sr.shape == (2, 3, 12 * scale, 10 * scale)
    sr.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values() if g is not None)
    # the adaptive module's fusion always learns; the null embedding only when no vector is given
    assert grads["adaptive.fusion.weight"].abs().sum() > 0
    null_grad = grads["adaptive.null_embedding"]
    assert (null_grad is not None and null_grad.abs().sum() > 0) == (not with_clip)


def test_adaptive_module_has_the_method_sizes():
    model = create_model("cdasr-lite", 4)
    mlp = model.adaptive.mlp
    assert (mlp[0].in_features, mlp[0].out_features) == (512, 1024)
    assert (mlp[2].in_features, mlp[2].out_features) == (1024, 512)
    assert model.adaptive.spatial[0].in_channels == 512


def test_clip_vector_changes_the_output():
    torch.manual_seed(0)
    model = create_model("cdasr-tiny", 2)
    # the fusion starts as a pass-through of F(x); perturb it so the condition reaches the output
    with torch.no_grad():
        model.adaptive.fusion.weight.normal_(0, 0.1)
    lr = torch.rand(1, 3, 8, 8)
    a = torch.nn.functional.normalize(torch.randn(1, 512), dim=1)
    b = torch.nn.functional.normalize(torch.randn(1, 512), dim=1)
    with torch.no_grad():
        assert not torch.allclose(model(lr, a), model(lr, b))
        assert torch.allclose(model(lr, None), model(lr, model.adaptive.null_embedding[None]))


@pytest.mark.parametrize("arch", ["cdasr-lite", "cdasr-base"])
def test_folded_model_is_equivalent_and_smaller(arch):
    torch.manual_seed(0)
    model = create_model(arch, 4).eval()
    with torch.no_grad():
        model.adaptive.fusion.weight.normal_(0, 0.05)
    folded = model.folded()
    lr = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(folded(lr), model(lr), rtol=0, atol=1e-5)
    assert count_parameters(folded) < count_parameters(model)
    with pytest.raises(ValueError, match="folded"):
        folded(lr, torch.zeros(1, 512))
    # the original keeps its adaptive branch
    assert hasattr(model.adaptive, "mlp")


def test_lightweight_model_is_in_its_parameter_budget():
    for scale in SCALES:  # x16 too: its upsampler goes through a narrow stage to stay in budget
        n = count_parameters(create_model("cdasr-lite", scale).folded())
        assert 100_000 <= n <= 500_000, (scale, n)


def test_bad_inputs_are_refused_clearly():
    model = create_model("cdasr-tiny", 2)
    with pytest.raises(ValueError, match=r"\[B, 3, h, w\]"):
        model(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="embedding must have shape"):
        model(torch.rand(2, 3, 8, 8), torch.rand(2, 256))
    with pytest.raises(ValueError, match="unsupported scale x5"):
        create_model("cdasr-tiny", 5)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("no-such-net", 2)


def test_architecture_configs_are_data():
    assert {"cdasr-lite", "cdasr-base", "cdasr-tiny"} <= set(list_models())
    cfg = get_model_config("cdasr-lite")
    cfg["channels"] = 1  # a copy: the registry is not mutated
    assert get_model_config("cdasr-lite")["channels"] != 1
