import time
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from clipsr.clip import TINY_ARCH, ClipEncoder, ColorStatsEncoder, EncoderIdentity
from clipsr.digest import tensors_sha256


@pytest.fixture
def encoder():
    return ClipEncoder.load(TINY_ARCH, seed=0)


def _images(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.random((40 + 8 * i, 56, 3), dtype=np.float32) for i in range(n)]


def _count_forwards(enc):
    """Number of images the tower has been run on."""
    seen = []
    enc.visual.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    return seen


def test_identity_is_stable_per_seed_and_differs_across_seeds():
    a, b, c = (ClipEncoder.load(TINY_ARCH, seed=s) for s in (0, 0, 1))
    assert a.identity == b.identity
    assert a.identity.matches(b.identity)
    assert not a.identity.matches(c.identity)
    assert a.identity.weights == "random:0" and not a.identity.semantic_prior
    assert a.identity.embed_dim == a.embed_dim == 512


def test_seeded_load_leaves_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    ClipEncoder.load(TINY_ARCH, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_identity_dict_roundtrip_and_validation(encoder):
    data = encoder.identity.to_dict()
    assert EncoderIdentity.from_dict(data) == encoder.identity
    with pytest.raises(ValueError, match="sha256"):
        EncoderIdentity.from_dict({k: v for k, v in data.items() if k != "sha256"})
    with pytest.raises(ValueError, match="embed_dim"):
        EncoderIdentity.from_dict({**data, "embed_dim": "512"})


def test_full_open_clip_checkpoint_loads_from_path_and_file_uri(tmp_path):
    torch.manual_seed(3)
    model = open_clip.create_model(TINY_ARCH)
    path = tmp_path / "tiny-clip.pt"
    torch.save(model.state_dict(), path)
    source_sha = tensors_sha256(model.visual.state_dict())

    from_path = ClipEncoder.load(TINY_ARCH, str(path))
    assert from_path.identity.sha256 == source_sha
    assert from_path.identity.weights == "file:tiny-clip.pt" and from_path.identity.semantic_prior

    cache = tmp_path / "cache"
    from_uri = ClipEncoder.load(TINY_ARCH, path.as_uri(), cache_dir=cache)
    assert from_uri.identity.sha256 == source_sha
    assert from_uri.identity.weights == path.as_uri()
    assert list((cache / "weights").rglob("tiny-clip.pt")), "URI weights are kept in the cache"
    path.unlink()  # the cached copy is enough from now on
    assert ClipEncoder.load(TINY_ARCH, path.as_uri(), cache_dir=cache).identity.sha256 == source_sha


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_torchscript_checkpoint_like_openai_release_loads(tmp_path):
    torch.manual_seed(4)
    model = open_clip.create_model(TINY_ARCH)

    class ImageOnly(torch.nn.Module):  # keeps the "visual." key prefix of OpenAI's archives
        def __init__(self):
            super().__init__()
            self.visual = model.visual

        def forward(self, x):
            return self.visual(x)

    path = tmp_path / "ViT-tiny.pt"
    torch.jit.trace(ImageOnly(), torch.rand(1, 3, 64, 64)).save(str(path))
    loaded = ClipEncoder.load(TINY_ARCH, str(path))
    assert loaded.identity.sha256 == tensors_sha256(model.visual.state_dict())


def test_tower_only_safetensors_gives_source_identity(tmp_path):
    source = ClipEncoder.load(TINY_ARCH, seed=5)
    path = tmp_path / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in source.visual.state_dict().items()}, str(path))
    loaded = ClipEncoder.load(TINY_ARCH, str(path))
    assert loaded.identity.matches(source.identity)
    images = _images(2)
    np.testing.assert_allclose(loaded.embed_images(images), source.embed_images(images), atol=1e-6)


def test_weights_for_another_tower_are_rejected(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"conv1.weight": torch.zeros(8, 3, 4, 4)}, path)
    with pytest.raises(ValueError, match="do not fit"):
        ClipEncoder.load(TINY_ARCH, str(path))


def test_unknown_arch_and_missing_file_errors(tmp_path):
    with pytest.raises(ValueError, match="ViT-B-32"):
        ClipEncoder.load("ViT-Nonexistent-99")
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        ClipEncoder.load(TINY_ARCH, str(missing))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ClipEncoder.load(TINY_ARCH, missing.as_uri())


def test_pretrained_tag_without_local_copy_fails_fast_with_advice():
    hf_cache = Path("~/.cache/huggingface/hub/models--timm--vit_base_patch32_clip_224.openai").expanduser()
    if hf_cache.exists() or Path("~/.cache/clip/ViT-B-32.pt").expanduser().exists():
        pytest.skip("OpenAI ViT-B-32 weights are cached on this machine")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="local weights file or a URI"):
        ClipEncoder.load("ViT-B-32", "openai")
    assert time.monotonic() - start < 5.0
    with pytest.raises(ValueError, match="pretrained tag"):
        ClipEncoder.load(TINY_ARCH, "no-such-tag")


def test_embeddings_are_unit_vectors_and_batching_does_not_change_them():
    images = _images(5)
    batched = ClipEncoder.load(TINY_ARCH).embed_images(images, batch_size=4)
    single = ClipEncoder.load(TINY_ARCH).embed_images(images, batch_size=1)
    assert batched.shape == (5, 512) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_embed_images_matches_embed_tensor(encoder):
    image = _images(1)[0]
    tensor = torch.from_numpy(image.transpose(2, 0, 1))[None]
    with torch.no_grad():
        expected = encoder.embed_tensor(tensor).numpy()
    np.testing.assert_allclose(encoder.embed_images([image]), expected, atol=1e-5)


def test_cache_avoids_recomputation_in_memory_and_on_disk(tmp_path):
    images = _images(3)
    first = ClipEncoder.load(TINY_ARCH, cache_dir=tmp_path)
    forwards = _count_forwards(first)
    out = first.embed_images(images + [images[0].copy()])  # a duplicate is embedded once
    assert sum(forwards) == 3
    np.testing.assert_array_equal(out[0], out[3])
    np.testing.assert_array_equal(first.embed_images(images[::-1]), out[:3][::-1])
    assert sum(forwards) == 3

    second = ClipEncoder.load(TINY_ARCH, cache_dir=tmp_path)  # a fresh process, same encoder
    forwards = _count_forwards(second)
    np.testing.assert_array_equal(second.embed_images(images), out[:3])
    assert sum(forwards) == 0

    other = ClipEncoder.load(TINY_ARCH, seed=1, cache_dir=tmp_path)  # other weights never reuse it
    forwards = _count_forwards(other)
    other.embed_images(images)
    assert sum(forwards) == 3


def test_grey_and_uint8_images_are_accepted(encoder):
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, (48, 64, 1), dtype=np.uint8)
    rgb = np.repeat(grey, 3, axis=2)
    as_float = rgb.astype(np.float32) / 255.0
    out = encoder.embed_images([grey, rgb, as_float])
    np.testing.assert_allclose(out[0], out[1], atol=1e-6)
    np.testing.assert_allclose(out[1], out[2], atol=1e-5)
    with pytest.raises(ValueError, match="HxWxC"):
        encoder.embed_images([grey[..., 0]])


def test_embed_tensor_is_differentiable_and_weights_stay_frozen(encoder):
    x = torch.rand(2, 3, 40, 52, requires_grad=True)
    embedding = encoder.embed_tensor(x)
    assert embedding.shape == (2, 512)
    torch.testing.assert_close(embedding.norm(dim=1), torch.ones(2))
    embedding[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in encoder.visual.parameters())
    assert not encoder.visual.training


def test_color_stats_encoder_is_deterministic_and_separates_grey_from_colour():
    a, b = ColorStatsEncoder(), ColorStatsEncoder()
    assert a.identity == b.identity and a.identity.arch == "color-stats" and not a.identity.semantic_prior
    assert ColorStatsEncoder(seed=1).identity.sha256 != a.identity.sha256
    rng = np.random.default_rng(0)
    grey = [rng.integers(100, 200, (32, 32, 1), dtype=np.uint8) for _ in range(2)]
    colour = [np.clip(rng.random((32, 32, 3)) * [1.0, 0.3, 0.1], 0, 1) for _ in range(2)]
    out = a.embed_images(grey + colour)
    assert out.shape == (4, 512)
    np.testing.assert_allclose(out, b.embed_images(grey + colour))
    sims = out @ out.T
    assert sims[0, 1] > 0.9 and sims[2, 3] > 0.9
    assert sims[0, 2] < 0.5


# --- the conditioning path: what the SR model is given, in training, adaptation and inference ---


def test_masked_rows_take_the_null_embedding_and_train_it():
    from clipsr.factory import create_model

    torch.manual_seed(0)
    model = create_model("cdasr-tiny", 2)
    lr = torch.rand(3, 3, 8, 8)
    emb = torch.nn.functional.normalize(torch.randn(3, 512), dim=1)
    mask = torch.tensor([True, False, True])
    out = model(lr, emb, mask)
    torch.testing.assert_close(out[[0, 2]], model(lr[[0, 2]], None))
    torch.testing.assert_close(out[[1]], model(lr[[1]], emb[[1]]))
    out.sum().backward()
    assert model.adaptive.null_embedding.grad.abs().sum() > 0
    # no row dropped: the null embedding still takes part, with a zero gradient
    model.zero_grad(set_to_none=True)
    model(lr, emb, torch.zeros(3, dtype=torch.bool)).sum().backward()
    assert model.adaptive.null_embedding.grad is not None and not model.adaptive.null_embedding.grad.any()


def test_adaptation_conditions_each_patch_on_its_exemplars_lr_and_scores_as_inference_does(encoder, tmp_path):
    """A conditioned source model: every training patch carries the embedding of its own training
    exemplar's whole LR, and the held-out score is that of the upscaler inference builds with the
    same encoder."""
    from clipsr.adapt.fast import adapt_domain
    from clipsr.adapt.settings import AdaptSettings
    from clipsr.degrade import make_lr, modcrop
    from clipsr.evaluate import score_image
    from clipsr.factory import create_model, load_checkpoint, save_checkpoint
    from clipsr.inference import NetworkUpscaler

    torch.manual_seed(0)
    path = str(tmp_path / "conditioned.safetensors")
    save_checkpoint(path, create_model("cdasr-tiny", 2), "cdasr-tiny", clip_encoder=encoder.identity.to_dict())
    model, meta = load_checkpoint(path)
    rng = np.random.default_rng(0)
    shots = [(rng.random((40, 40 + 4 * i, 3)) * 255).astype(np.uint8) for i in range(4)]
    lr_emb = encoder.embed_images([make_lr(modcrop(s, 2), 2) for s in shots])
    seen: list[np.ndarray] = []

    def record(module, args):
        seen.extend(args[1].detach().numpy())

    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: record(m, args) if m.__class__.__name__ == "DomainAdaptiveModule" and torch.is_grad_enabled()
        and args[1] is not None else None)
    try:
        s = AdaptSettings(candidates=(("all", 1e-3),), steps=6, batch=3, lr_patch=12, holdout=1)
        result = adapt_domain(model, meta, shots, s, encoder)
    finally:
        hook.remove()
    assert len(seen) == 6 * 3  # every training patch was conditioned
    for vector in seen:  # on one of the three training exemplars, never the held-out one
        distances = np.abs(lr_emb - vector).max(axis=1)
        assert distances[:3].min() < 1e-5 and distances[3] > 1e-3
    inference = NetworkUpscaler(result.model, meta, encoder=encoder)
    assert result.heldout_after == pytest.approx(score_image(inference, shots[3], 2)["psnr_y"], abs=1e-9)
