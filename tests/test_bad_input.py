"""Bad input and mistakes (issue 22): nothing lost, nothing read or run from outside where it
should be, and a clear message with exit 2 instead of a traceback. Every bad file is made here."""
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm2rec_lab.cli import main
from vlm2rec_lab.data.synthetic import generate
from vlm2rec_lab.config import SynthConfig


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def tree(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its size: what a command must leave alone."""
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """A small synthetic raw folder (reviews, metadata, images, oracle)."""
    return generate(SynthConfig(users=60, items=40, seed=5), tmp_path_factory.mktemp("raw") / "raw")


def prepare_args(raw: Path, out: Path, *extra):
    return ("data", "prepare", "--format", "amazon2018", "--input", *sorted(raw.glob("*.json.gz")),
            "--images", raw / "images", "--out", out, "--num-negatives", "10", *extra)


# --------------------------------------------------------------------------- data loss


def test_overwrite_never_replaces_an_input_or_a_folder_that_is_not_a_dataset(raw, tmp_path, capsys):
    before = tree(raw)
    for out, rule in ((raw, "holds the input"), (raw / "images", "holds the input"), (raw.parent, "holds the input")):
        code, _, err = run(capsys, *prepare_args(raw, out, "--overwrite"))
        assert code == 2 and f"{out}: {rule}" in err and "choose another --out" in err, err
    assert tree(raw) == before  # the reviews, metadata, images and oracle are all still there
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep me")
    code, _, err = run(capsys, *prepare_args(raw, other, "--overwrite"))
    assert code == 2 and "is not a folder this command writes (no manifest.json" in err
    assert (other / "mine.txt").read_text() == "keep me"
    # a prepared dataset is replaced with --overwrite, and without it the flag is named
    ds = tmp_path / "ds"
    assert run(capsys, *prepare_args(raw, ds))[0] == 0
    code, _, err = run(capsys, *prepare_args(raw, ds))
    assert code == 2 and "already exists (pass --overwrite to replace it)" in err
    (ds / "stale.txt").write_text("x")
    assert run(capsys, *prepare_args(raw, ds, "--overwrite"))[0] == 0 and not (ds / "stale.txt").exists()


def test_synth_overwrite_replaces_only_a_synthetic_raw_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "reviews.json").write_text("{}")
    code, _, err = run(capsys, "data", "synth", "--out", mine, "--users", 30, "--items", 20, "--overwrite", "--no-report")
    assert code == 2 and "no oracle/latents.json in it" in err and (mine / "reviews.json").exists()


def test_a_killed_write_leaves_a_temporary_folder_that_the_next_write_removes(raw, tmp_path, capsys):
    out = tmp_path / "ds"
    script = ("import os, sys\nfrom vlm2rec_lab.io import atomic_dir\n"
              "with atomic_dir(sys.argv[1]) as tmp:\n    (tmp / 'half.parquet').write_bytes(b'x' * 100)\n"
              "    os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", script, str(out)], check=False)
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ds.tmp-")]
    assert len(stale) == 1 and not out.exists()  # the premise: a killed write leaves one behind
    (tmp_path / ".ds.tmp-abc123").mkdir()  # one an older version left (no process id in its name)
    live = tmp_path / f".ds.tmp-{os.getpid()}-live"  # one this process is writing: kept
    live.mkdir()
    assert run(capsys, *prepare_args(raw, out))[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["ds", live.name])


def test_prepared_folders_follow_the_umask(raw, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert run(capsys, *prepare_args(raw, tmp_path / "ds"))[0] == 0
        os.umask(0o077)
        assert run(capsys, *prepare_args(raw, tmp_path / "private"))[0] == 0
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "ds") == 0o755 and mode(tmp_path / "ds" / "manifest.json") == 0o644
    assert mode(tmp_path / "ds" / "items.parquet") == 0o644 and mode(tmp_path / "ds" / "negatives") == 0o755
    assert mode(tmp_path / "private") == 0o700 and mode(tmp_path / "private" / "manifest.json") == 0o600


def test_an_output_whose_parent_cannot_be_written_is_a_clear_error(raw, tmp_path, capsys):
    out = Path("/sys/vlm2rec_lab_test/out")  # nobody, root included, may make a folder in /sys
    code, _, err = run(capsys, *prepare_args(raw, out))
    assert code == 2 and f"{out}: cannot write in /sys" in err and "choose an --out" in err, err
    if os.geteuid() != 0:  # (root writes in a read-only folder anyway)
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        code, _, err = run(capsys, *prepare_args(raw, locked / "ds"))
        assert code == 2 and "cannot write in" in err


def test_a_dataset_file_from_another_prepare_is_refused_on_load(raw, tmp_path, capsys):
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.io import DataFormatError

    a, b = tmp_path / "a", tmp_path / "b"
    other = generate(SynthConfig(users=60, items=40, seed=6), tmp_path / "raw6")  # another domain
    assert run(capsys, *prepare_args(raw, a))[0] == 0
    assert run(capsys, *prepare_args(other, b))[0] == 0
    Dataset.load(a)  # its own files load
    shutil.copy(b / "interactions.parquet", a / "interactions.parquet")
    with pytest.raises(DataFormatError, match="interactions.parquet: is not the file this dataset's manifest.json recorded"):
        Dataset.load(a)
    code, _, err = run(capsys, "data", "stats", a)
    assert code == 2 and "prepare the folder again" in err


def test_negatives_from_another_prepare_are_refused_when_read(raw, tmp_path, capsys):
    from vlm2rec_lab.data.dataset import Dataset
    from vlm2rec_lab.io import DataFormatError

    a = tmp_path / "a"
    assert run(capsys, *prepare_args(raw, a))[0] == 0
    neg = np.load(a / "negatives" / "seed_1.npy")
    np.save(a / "negatives" / "seed_1.npy", neg[::-1].copy())  # same size, other content
    ds = Dataset.load(a)
    assert ds.negatives(0).shape == neg.shape
    with pytest.raises(DataFormatError, match=r"seed_1.npy: is not the file .* \(its SHA-256 differs\)"):
        ds.negatives(1)


# --------------------------------------------------------------------------- messages


def test_messages_name_the_flags_and_the_dropped_items(raw, tmp_path, capsys):
    code, _, err = run(capsys, *prepare_args(raw, tmp_path / "x", "--num-negatives", "39"))
    assert code == 2 and "lower --num-negatives to" in err
    # metadata whose titles are all empty: the ids-only way out is named
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(next(raw.glob("[!m]*.json.gz")), src / "reviews.json.gz")
    import gzip

    metas = [json.loads(line) for line in gzip.open(next(raw.glob("meta_*.json.gz")), "rt")]
    with gzip.open(src / "meta_x.json.gz", "wt") as f:
        f.writelines(json.dumps({**m, "title": "  "}) + "\n" for m in metas)
    code, _, err = run(capsys, "data", "prepare", "--format", "amazon2018", "--input", src / "reviews.json.gz",
                       src / "meta_x.json.gz", "--out", tmp_path / "y", "--require-images", "no")
    assert code == 2 and "pass --require-titles no" in err
    # two items' images missing: the report names them
    images = tmp_path / "images"
    shutil.copytree(raw / "images", images)
    gone = sorted(images.iterdir())[:2]
    for p in gone:
        p.unlink()
    code, out, _ = run(capsys, "data", "prepare", "--format", "amazon2018", "--input", *sorted(raw.glob("*.json.gz")),
                       "--images", images, "--out", tmp_path / "z", "--k-core", "2", "--num-negatives", "10")
    assert code == 0
    line = next(ln for ln in out.splitlines() if ln.startswith("dropped:"))
    assert "no_image 2 (e.g. " in line and all(p.stem in line for p in gone), line


# --------------------------------------------------------------------------- runs: resume, checkpoints, adapters


@pytest.fixture(scope="module")
def trained(synth_ds, tiny_path, tmp_path_factory):
    """A 2-step vlm-sft run (checkpoint every step), through the command line."""
    run_dir = tmp_path_factory.mktemp("runs") / "sft"
    assert main(TRAIN + ["--data", str(synth_ds.path), "--out", str(run_dir)]) == 0
    return run_dir


TRAIN = ["train", "--method", "vlm-sft", "--max-steps", "2", "--users-k", "16", "--batch-size", "8",
         "--checkpoint-every", "1", "--no-embed"]


def test_resume_with_nothing_to_resume_is_refused_unless_fresh(synth_ds, trained, tmp_path, capsys):
    typo = tmp_path / "sft-typo"
    code, _, err = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", typo, "--resume")
    assert code == 2 and f"{typo}: --resume, but no run is here" in err and "--fresh" in err and not typo.exists()
    copy = tmp_path / "sft"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "checkpoint")
    code, _, err = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", copy, "--resume")
    assert code == 2 and f"{copy / 'checkpoint'}: no checkpoint to resume from" in err and "add --fresh" in err
    code, out, _ = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", copy, "--resume", "--fresh")
    assert code == 0 and "for 2 steps" in out
    # a run set: none of its seeds here is a typo; some here, the others start
    code, _, err = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", tmp_path / "set", "--seeds", "0-1", "--resume")
    assert code == 2 and "none of the runs of seeds [0, 1] is here" in err
    shutil.copytree(trained, tmp_path / "set" / "seed0")  # seed 0 killed after its checkpoint, seed 1 not begun
    code, out, _ = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", tmp_path / "set", "--seeds", "0-1", "--resume")
    assert code == 0 and (tmp_path / "set" / "seed1" / "adapter").is_dir()


def test_the_checkpoint_is_rebuilt_from_tensors_and_plain_values_only(synth_ds, trained, tmp_path, capsys):
    """A shared run folder must not run code on --resume: a pickled callable in state.pt is
    refused and never called; the toolkit's own checkpoint loads with weights_only."""
    state = torch.load(trained / "checkpoint" / "state.pt", weights_only=True)  # what the trainer wrote
    assert state["step"] == 2
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    copy = tmp_path / "sft"
    shutil.copytree(trained, copy)
    torch.save({**state, "extra": Payload()}, copy / "checkpoint" / "state.pt")
    code, _, err = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", copy, "--resume")
    assert code == 2 and f"{copy / 'checkpoint' / 'state.pt'}: refused" in err
    assert not marker.exists()
    # a truncated checkpoint: named, with what to do
    data = (trained / "checkpoint" / "state.pt").read_bytes()
    (copy / "checkpoint" / "state.pt").write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, *TRAIN, "--data", synth_ds.path, "--out", copy, "--resume")
    assert code == 2 and f"{copy / 'checkpoint' / 'state.pt'}: unreadable (truncated or corrupt" in err and "--fresh" in err


def test_a_resumed_run_restores_every_random_state(tmp_path):
    import random

    from vlm2rec_lab.checkpoint import rng_state as _rng_state, set_rng_state as _set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    saved = _rng_state()
    torch.save(saved, tmp_path / "rng.pt")
    back = torch.load(tmp_path / "rng.pt", weights_only=True)
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    _set_rng_state(back)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_a_broken_adapter_is_named_on_embed(trained, tmp_path, capsys):
    copy = tmp_path / "sft"
    shutil.copytree(trained, copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    code, _, err = run(capsys, "embed", copy)
    assert code == 2 and f"{weights}: unreadable (truncated or corrupt" in err
    weights.unlink()
    code, _, err = run(capsys, "embed", copy)
    assert code == 2 and "no adapter_model.safetensors beside adapter_config.json" in err


# --------------------------------------------------------------------------- output: pipes, batches


def test_output_into_a_reader_that_left_finishes_the_work(raw, tmp_path):
    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "vlm2rec_lab.cli", *map(str, prepare_args(raw, out))]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parents[1])
    p.stdout.close()  # the reader leaves before the first line (`| head -0`)
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "closed by its reader" in err
    assert (out / "manifest.json").exists()


def test_batch_runs_the_good_datasets_and_reports_a_missing_one(synth_ds, tmp_path, capsys):
    missing = tmp_path / "typo"
    code, out, err = run(capsys, "batch", "--datasets", missing, synth_ds.path, "--out", tmp_path / "out",
                         "--notebooks", "00", "--quick")
    assert code == 1
    assert f"{missing}: not a prepared dataset (no manifest.json)" in out
    assert (tmp_path / "out" / synth_ds.path.name / "00_template.ipynb").exists()  # the good one ran
    assert "1 passed, 0 skipped, 1 failed" in out
    index = (tmp_path / "out" / "index.html").read_text()
    assert "not a prepared dataset" in index and "class='fail'" in index and "class='ok'" in index
