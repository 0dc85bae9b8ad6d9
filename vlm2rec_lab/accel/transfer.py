"""Host-to-device copies that do not make the host wait for the device.

A copy from ordinary (pageable) host memory may block the host until the device's stream has caught
up, since the driver must first stage the bytes in pinned memory. Small CPU tensors (token layouts,
rotary positions, segment bounds, index tensors) are therefore staged in pinned memory by PyTorch's
caching host allocator (its blocks are reused, and kept until the copy that reads them is done)
and copied asynchronously. Large buffers (pixels) are not meant for this: pinned memory is a scarce
resource.
"""
from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor | None, device) -> Tensor | None:
    """``t`` on ``device``: from the CPU to a GPU through pinned memory, without waiting; else a
    plain ``.to``. None stays None."""
    if t is None:
        return None
    device = torch.device(device)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
