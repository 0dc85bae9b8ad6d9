"""Two CPU processes (gloo) against one: the same global-batch loss and gradients, and the same item
embeddings from a sharded embedding run."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from vlm2rec_lab.accel.distributed import free_port

WORKER = Path(__file__).with_name("dist_worker.py")
ROOT = Path(__file__).resolve().parents[1]


def _launch(nproc: int, args: list[str], launcher: str = "torchrun", options: tuple = (), expect: int = 0,
            timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``args`` (a script and its arguments, or ``-m module ...``) in ``nproc`` CPU processes (gloo):
    one plain process, or ``nproc`` started by torchrun or by ``accelerate launch --multi_gpu`` (which
    starts them through torchrun's launcher, on CPUs too; without it, accelerate starts one process
    on a machine without GPUs) with ``options`` for the launcher; ``expect``: 0, or 1 for a launch
    that must fail."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo on CPUs
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        port = str(free_port())
        cmd = {"torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                            "--master_port", port],
               "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                              str(nproc), "--main_process_port", port]}[launcher] + list(options) + list(args)
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()  # a launcher stops the processes it started (each in a session of its own) on SIGTERM
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            raise AssertionError(f"the launch did not end in {timeout} s: {err[-3000:]}") from None
    r = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert (r.returncode != 0) == bool(expect), r.stderr[-3000:]
    return r


def _run(nproc: int, mode: str, data, out) -> None:
    _launch(nproc, [str(WORKER), mode, str(data), str(out)])


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


def test_each_process_draws_its_own_dropout_masks_and_resumes_its_own_stream(synth_ds, tiny_path, tmp_path,
                                                                               monkeypatch):
    """At LoRA dropout 0.2: rank 0 keeps the one-process stream, rank 1 has another (one seed on every
    rank would drop rows of both ranks at the same packed positions alike); a checkpoint holds
    every rank's state, so 2 steps and a resumed third log the same losses as 3 steps at once. That
    2-process checkpoint (its last, step 3) resumed by one process: rank 0 goes on with its own
    stream; a rank beyond 0 on a process count other than the checkpoint's starts the stream drawn
    from the seed, its rank and the step; a checkpoint without every rank's state (an older one) too."""
    _run(1, "resume", synth_ds.path, tmp_path)
    _run(2, "resume", synth_ds.path, tmp_path)
    one, two = torch.load(tmp_path / "resume_1.pt"), torch.load(tmp_path / "resume_2.pt")
    assert torch.equal(one["streams"][0], two["streams"][0])
    assert not torch.equal(two["streams"][0], two["streams"][1])
    for got in (one, two):
        assert len(got["whole"]) == 3 and got["resumed"][:3] == got["whole"]
    assert abs(two["whole"][0] - one["whole"][0]) <= 1e-6  # (LoRA B starts at zero: no mask matters in step 1)
    assert abs(two["whole"][1] - one["whole"][1]) > 1e-6  # (other masks for rank 1's rows, an equal distribution)

    # the 2-process checkpoint resumed by one process (and as rank 2 of 3)
    from vlm2rec_lab.accel import distributed as dist
    from vlm2rec_lab.config import TrainConfig
    from vlm2rec_lab.checkpoint import rank_seed
    from vlm2rec_lab.train import Trainer

    state = torch.load(tmp_path / "part2" / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 3 and len(state["rng_ranks"]) == 2
    cfg = TrainConfig(method="vlm2rec", batch_size=8, users_k=32, lora_dropout=0.2, grad_cos_every=0,
                      checkpoint_every=2, max_steps=4)
    tr = Trainer(cfg, synth_ds, tmp_path / "part2", progress=False)
    assert tr.load_checkpoint() and tr.step == 3
    assert torch.equal(torch.get_rng_state(), state["rng_ranks"][0]["torch"])
    torch.manual_seed(rank_seed(0, 2, 3))
    expected = torch.get_rng_state()
    monkeypatch.setattr(dist, "rank", lambda: 2)  # rank 2 of 3, say
    for older in (False, True):
        if older:
            del state["rng_ranks"]
            torch.save(state, tmp_path / "part2" / "checkpoint" / "state.pt")
        assert tr.load_checkpoint() and torch.equal(torch.get_rng_state(), expected)


@pytest.mark.parametrize("mode", ["fail", "crash"])
def test_a_process_that_fails_alone_ends_the_launch_instead_of_hanging_it(mode, tmp_path):
    """Rank 1 raises while rank 0 waits for it in an all-gather: an error the command line reports
    (exit code 2) or one it does not catch (a traceback, exit code 1). Either way rank 1 leaves at
    once, without waiting in the exit barrier, and torchrun stops rank 0 and fails the launch, in
    seconds (before, both waited until gloo's 30-minute timeout)."""
    r = _launch(2, [str(WORKER), mode, str(tmp_path), str(tmp_path)], expect=1, timeout=120)
    said = {"fail": "error: rank 1 alone: fail", "crash": "RuntimeError: rank 1 alone: crash"}[mode]
    assert said in r.stderr
    code = {"fail": 2, "crash": 1}[mode]  # torchrun's report of rank 1's exit
    assert re.search(rf"rank\s+: 1 \(local_rank: 1\)\s+exitcode\s+: {code} ", r.stderr), r.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_the_gpu_process_group_gathers_cpu_and_cuda_tensors_on_gpu(tmp_path):
    """On GPUs the sharded item embeddings are gathered as CPU tensors, the training embeddings and
    gradients as CUDA tensors: the backend chosen there takes both (NCCL alone has no CPU
    collectives), and the gather's backward too. One process, so that a one-GPU machine checks it."""
    import torch.distributed as tdist

    from vlm2rec_lab.accel.distributed import backend

    tdist.init_process_group(backend(True), store=tdist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for device in ("cpu", "cuda"):
            x = torch.arange(6.0, device=device).reshape(2, 3)
            out = [torch.zeros_like(x)]
            tdist.all_gather(out, x)
            assert out[0].device == x.device and torch.equal(out[0], x)
            tdist.all_reduce(x)
            assert torch.equal(x.cpu(), torch.arange(6.0).reshape(2, 3))
        # the differentiable gather of the training embeddings: with a mixed group its backward
        # takes torch's all-to-all path (not NCCL's reduce-scatter), on CUDA tensors through NCCL
        from torch.distributed.nn.functional import all_gather

        x = torch.randn(2, 3, device="cuda", requires_grad=True)
        (torch.cat(all_gather(x)) * 3).sum().backward()
        assert torch.equal(x.grad, torch.full_like(x, 3.0))
        got = [None]
        tdist.all_gather_object(got, {"rng": torch.get_rng_state()})
        assert torch.equal(got[0]["rng"], torch.get_rng_state())
        tdist.barrier()
    finally:
        tdist.destroy_process_group()


def test_two_processes_fill_the_vision_cache_a_share_each_and_both_hold_all(synth_ds, tiny_path, tmp_path):
    """Before training each process encodes its share of the images and the features are gathered:
    both processes end up holding every image's features and grid, the same as one process's, and
    the vision tower saw each missing image once over both (images 3 and 5 were cached beforehand
    on both ranks, 7 on rank 1 only)."""
    _run(1, "cache", synth_ds.path, tmp_path)
    _run(2, "cache", synth_ds.path, tmp_path)
    one, two = torch.load(tmp_path / "cache_1.pt"), torch.load(tmp_path / "cache_2.pt")
    n_images = int(synth_ds.items["image"].notna().sum())
    assert len(one["held"][0]) == n_images and one["encoded"] == [n_images]
    for held in two["held"]:
        assert held.keys() == one["held"][0].keys()
        for i, (f, g) in one["held"][0].items():
            assert torch.equal(held[i][1], g) and held[i][0].shape == f.shape
            assert torch.allclose(held[i][0], f, atol=1e-5), i
    # missing somewhere: every image but 3 and 5 (7 is missing on rank 0), split in contiguous halves
    # (rank 0 takes the odd one out, distributed.shard); plus what each rank encoded before (2 and 3)
    todo = n_images - 2
    assert two["encoded"] == [2 + todo - todo // 2, 3 + todo // 2]


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


# docs/multi_gpu.md's commands themselves: the command line's `train` under torchrun and under accelerate
# launch, two processes against one, two optimizer steps with the gradient-cosine probe.
CLI = ["-m", "vlm2rec_lab.cli"]
TRAIN = ["train", "--backbone", "tiny", "--method", "vlm2rec", "--batch-size", "8", "--max-steps", "2",
         "--grad-cos-every", "1"]


@pytest.fixture(scope="module")
def one_process_run(synth_ds, tiny_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "one"
    _launch(1, [*CLI, *TRAIN, "--data", str(synth_ds.path), "--out", str(out)])
    return out


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_the_command_line_under_a_launcher_trains_and_embeds_as_one_process(launcher, one_process_run, synth_ds,
                                                                           tmp_path):
    out = tmp_path / launcher
    train = [*CLI, *TRAIN, "--data", str(synth_ds.path), "--out", str(out)]
    if launcher == "torchrun":  # train, then embed as a command of its own
        _launch(2, [*train, "--no-embed"])
        assert not (out / "embeddings").exists()
        _launch(2, [*CLI, "embed", str(out), "--device", "cpu"])
    else:  # train and embed in one command; accelerate's own precision flag is said to be unused
        r = _launch(2, train, launcher="accelerate", options=("--mixed_precision", "bf16"))
        assert "accelerate launch --mixed_precision bf16 is not used" in r.stderr
        assert r.stderr.count("--mixed_precision bf16 is not used") == 1  # rank 0 says it
        assert (out / "metrics" / "task1_test.json").exists()
    one, two = (json.loads((run / "manifest.json").read_text()) for run in (one_process_run, out))
    assert (one["processes"], two["processes"]) == (1, 2)
    a, b = pd.read_csv(one_process_run / "logs" / "train_log.csv"), pd.read_csv(out / "logs" / "train_log.csv")
    assert list(a["step"]) == list(b["step"]) == [1, 2]
    for k in ("loss", "wpcl", "crtr", "cos_total_t", "cos_total_v"):
        assert np.allclose(a[k], b[k], atol=1e-5, rtol=0), (k, list(a[k]), list(b[k]))
    for name in ("item_T", "item_V", "item_F", "seq_test_F"):
        x = np.load(one_process_run / "embeddings" / f"{name}.npy")
        y = np.load(out / "embeddings" / f"{name}.npy")
        assert x.shape == y.shape and np.allclose(x, y, atol=1e-5), name


def test_accelerate_settings_the_project_does_not_read_are_named():
    from vlm2rec_lab.accel.distributed import launcher_warnings

    assert launcher_warnings({}) == []
    assert launcher_warnings({"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}) == []
    notes = launcher_warnings({"ACCELERATE_MIXED_PRECISION": "fp16", "ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"})
    assert len(notes) == 2
    assert "--mixed_precision fp16 is not used" in notes[0] and "--dynamo_backend inductor" in notes[1]
    assert "--compile" in notes[1]


def test_each_process_computes_on_the_gpu_of_its_local_rank(monkeypatch):
    """A bare cuda is the process's current GPU (torchrun's local rank, set when it joins). Another
    GPU named under a launcher (by --device, or by a run's config from a one-GPU run) becomes the
    local rank's, with a warning; a process beyond the machine's GPUs is refused one."""
    from vlm2rec_lab.accel import distributed as dist
    from vlm2rec_lab.backbones import backbone_device

    assert backbone_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert backbone_device("cuda") == torch.device("cuda", 1)
    assert backbone_device("cuda:0") == torch.device("cuda", 0)  # one process: any GPU it names
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "rank", lambda: 1)
    monkeypatch.setattr(dist, "world_size", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert backbone_device("cuda") == torch.device("cuda", 1) and backbone_device("cuda:1") == torch.device("cuda", 1)
    with pytest.warns(RuntimeWarning, match=r"device cuda:0 in process 1 of 4: .*, here cuda:1"):
        assert backbone_device("cuda:0") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match=r"local rank 2 but this machine has 2 GPU\(s\): .* --device cpu"):
        backbone_device("cuda")
    assert backbone_device("cpu") == torch.device("cpu")


def test_processes_start_from_rank_0s_adapter_and_one_builds_the_tiny_backbone(synth_ds, tiny_path, tmp_path):
    """Rank 1 draws random numbers between loading the backbone and making its adapter (as a
    process that built the tiny backbone would) and still starts from rank 0's LoRA weights and
    α/β; under a launcher rank 1 asks for the tiny backbone only after rank 0 has it."""
    _run(2, "init", synth_ds.path, tmp_path)
    got = torch.load(tmp_path / "init_2.pt")
    assert got["same_start"] and got["lora_numel"] > 0
    assert got["order"] == [[0, "built"], [1, "asked after rank 0 built"]]


def test_single_process_commands_refuse_a_launcher(synth_ds, tmp_path):
    r = _launch(2, [*CLI, "data", "stats", str(synth_ds.path)], expect=1, timeout=120)
    assert "error: data runs in one process: of the commands, train and embed run under torchrun" in r.stderr
