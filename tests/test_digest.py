"""The one tensor content hash: what model ids, checkpoint checks and encoder identities compare."""
import torch

from clipsr.digest import tensors_sha256
from clipsr.factory import create_model, save_checkpoint


def test_hash_depends_on_content_not_order_or_device_and_covers_every_dtype():
    a = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.bfloat16)}
    assert tensors_sha256(a) == tensors_sha256(dict(reversed(list(a.items()))))
    assert tensors_sha256(a) != tensors_sha256({**a, "w": a["w"].reshape(3, 2)})  # same bytes, other shape
    assert tensors_sha256(a) != tensors_sha256({**a, "w": a["w"].double()})
    assert tensors_sha256(a) != tensors_sha256({**a, "b": a["b"] + 1})
    assert tensors_sha256({"m": torch.tensor([True, False])}) != tensors_sha256({"m": torch.tensor([False, True])})


def test_checkpoint_hash_is_the_shared_one(tmp_path):
    model = create_model("cdasr-tiny", 2)
    meta = save_checkpoint(str(tmp_path / "m.safetensors"), model, "cdasr-tiny")
    assert meta["weights_sha256"] == tensors_sha256(model.state_dict())
