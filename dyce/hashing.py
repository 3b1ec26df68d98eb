from __future__ import annotations

import hashlib

import torch
from torch import nn


def state_dict_sha256(module_or_state: nn.Module | dict[str, torch.Tensor]) -> str:
    """Content hash of a state_dict: names, dtypes, shapes and bytes, in key order.

    Identifies weights independently of the file format they were stored in, so a bank can
    say exactly which backbone and exits it was searched for.
    """
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous().reshape(-1)
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
