"""Two CPU processes (gloo) against one: the same global-batch loss and gradients, and the same item
embeddings from a sharded embedding run."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _run(nproc: int, mode: str, data, out) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), mode, str(data), str(out)]
    else:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(port),
               str(WORKER), mode, str(data), str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]


def test_global_batch_split_4_plus_4_equals_one_batch_of_8_with_the_probe(synth_ds, tiny_path, tmp_path):
    _run(1, "grads", synth_ds.path, tmp_path)
    _run(2, "grads", synth_ds.path, tmp_path)
    one, two = torch.load(tmp_path / "grads_1.pt"), torch.load(tmp_path / "grads_2.pt")
    assert abs(one["loss"] - two["loss"]) <= 1e-6
    assert one["grads"].keys() == two["grads"].keys()
    assert max((one["grads"][k] - two["grads"][k]).abs().max().item() for k in one["grads"]) <= 1e-6
    assert max(g.abs().max().item() for g in one["grads"].values()) > 0
    # then two optimizer steps with the gradient-cosine probe: the same logged losses (the second
    # after an averaged update) and the same cosines, which reduce the modality gradients over ranks
    assert len(one["log"]) == len(two["log"]) == 2
    for a, b in zip(one["log"], two["log"]):
        for k in ("loss", "wpcl", "crtr", "cos_total_t", "cos_total_v"):
            assert abs(a[k] - b[k]) <= 1e-5, (a["step"], k, a[k], b[k])
        assert 0 < abs(a["cos_total_t"]) <= 1 and 0 < abs(a["cos_total_v"]) <= 1


def test_averaging_over_processes_is_the_mean_in_buckets_per_dtype(tmp_path):
    """Gradient averaging flattens the tensors of one dtype into buckets (here of at most 10
    elements, so the 12-element tensor has a bucket of its own and the others share); every entry
    comes back as the mean over ranks, in its own dtype and shape; a missing gradient is zeros."""
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import rank_tensors

    _run(2, "reduce", tmp_path, tmp_path)
    got = torch.load(tmp_path / "reduce_2.pt")
    assert got["calls"] == [12, 5, 4, 10]  # one collective per bucket: fp32 12 | bf16 5 | fp64 4 | fp32 9 + 1
    for g, a, b in zip(got["mean"], rank_tensors(0), rank_tensors(1)):
        assert g.dtype == a.dtype and g.shape == a.shape
        assert torch.equal(g, ((a.double() + b.double()) / 2).to(a.dtype))
    zeros, mean0 = got["missing"]
    assert torch.equal(zeros, torch.zeros(2, 3))
    assert torch.equal(mean0, got["mean"][0])  # (already averaged: averaging again changes nothing)


def test_two_process_embedding_writes_the_same_item_embeddings(synth_ds, tiny_path, tmp_path):
    _run(1, "embed", synth_ds.path, tmp_path)
    _run(2, "embed", synth_ds.path, tmp_path)
    for name in ("item_T", "item_V", "item_F", "seq_test_F"):
        a = np.load(tmp_path / "embed1" / "embeddings" / f"{name}.npy")
        b = np.load(tmp_path / "embed2" / "embeddings" / f"{name}.npy")
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5), name
