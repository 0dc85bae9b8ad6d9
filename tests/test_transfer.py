"""Host-to-device copies through pinned memory (vlm2rec_lab.accel.transfer)."""
import pytest
import torch

from vlm2rec_lab.accel.transfer import to_device


def test_to_device_on_the_cpu_is_a_plain_to():
    t = torch.arange(6).reshape(2, 3)
    assert to_device(None, "cpu") is None
    assert to_device(t, "cpu") is t  # nothing to copy
    assert to_device(t, torch.device("cpu")) is t


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_device_copies_to_the_gpu_without_a_sync_on_gpu():
    """The same values on the GPU; staging through pinned memory and the copy make no device sync
    (CUDA's sync debug mode set to raise), behind work the device is still doing."""
    t = torch.arange(100_000, dtype=torch.int32)
    x = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(4):
            x = x @ x  # keep the device busy
        got = to_device(t, "cuda")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert got.device.type == "cuda" and torch.equal(got.cpu(), t)
