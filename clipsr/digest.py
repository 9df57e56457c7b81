"""One content hash for named tensors, shared by CLIP encoder identities and checkpoints.

A model id, a checkpoint's integrity check and an encoder identity all compare these hex digests,
so they must come from one function: two implementations would drift and make equal weights look
different.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import torch


def tensors_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of tensors by sorted key, dtype, shape and raw bytes.

    Independent of file format, device and insertion order; any dtype (bfloat16 included) is
    hashed by its bytes.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
