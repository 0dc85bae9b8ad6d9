import json
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch._functorch.config as functorch_config

from vlm2rec_lab.accel import packing
from vlm2rec_lab.cli import main
from vlm2rec_lab.config import SpeedConfig, TrainConfig
from vlm2rec_lab.evaluate import evaluate
from vlm2rec_lab.losses import ObjectiveOutput
from vlm2rec_lab.runs import create_run, embed_run, load_embeddings, load_manifest, load_run_config, run_method
from vlm2rec_lab.scorers import EmbeddingScorer
from vlm2rec_lab.train import Trainer, TrainingDiverged


class Killed(Exception):
    pass


def lora_state(tr):
    return {n: p.detach().clone() for n, p in tr.backbone.model.named_parameters() if p.requires_grad}


def test_killed_and_resumed_run_equals_uninterrupted(synth_ds, tiny_path, tmp_path):
    # 40 users x 1 example / batch 8 = 5 steps an epoch: 7 steps cross an epoch boundary;
    # LoRA dropout on, so the resumed RNG state matters too.
    cfg = TrainConfig(method="vlm2rec", users_k=40, batch_size=8, max_steps=7, checkpoint_every=2,
                      grad_cos_every=3, lora_dropout=0.2)
    a = Trainer(cfg, synth_ds, tmp_path / "a", progress=False)
    a.train()

    def kill(step):
        if step == 5:
            raise Killed()

    b = Trainer(cfg, synth_ds, tmp_path / "b", progress=False, on_step=kill)
    with pytest.raises(Killed):
        b.train()
    assert b.step == 5  # killed after step 5; the last checkpoint is from step 4
    c = Trainer(cfg, synth_ds, tmp_path / "b", progress=False)
    c.train(resume=True)
    assert c.step == a.step == 7
    sa, sc = lora_state(a), lora_state(c)
    assert sa.keys() == sc.keys()
    assert max((sa[k] - sc[k]).abs().max().item() for k in sa) <= 1e-6
    assert a.alpha.item() == pytest.approx(c.alpha.item(), abs=1e-6) and a.beta.item() == pytest.approx(c.beta.item(), abs=1e-6)
    la = pd.read_csv(tmp_path / "a" / "logs" / "train_log.csv")
    lc = pd.read_csv(tmp_path / "b" / "logs" / "train_log.csv")
    assert np.allclose(la["loss"], lc["loss"], atol=1e-6) and len(lc) == 7


def test_logs_hold_every_term_and_probe(synth_ds, tiny_path, tmp_path, monkeypatch):
    cfg = TrainConfig(method="vlm2rec", users_k=32, batch_size=8, max_steps=4, grad_cos_every=2, checkpoint_every=0)
    tr = Trainer(cfg, synth_ds, tmp_path, progress=False)
    real, forwards = packing.forward_packed, []  # the packed forwards of each step
    monkeypatch.setattr(packing, "forward_packed",
                        lambda backbone, seqs, *a, **k: forwards.append((tr.step, len(seqs))) or real(backbone, seqs, *a, **k))
    tr.train()
    per_step = [[n for s, n in forwards if s == step] for step in range(4)]
    assert per_step[1] == per_step[3] == [32]  # one forward of the four prompt sets (8 prompts each)
    assert per_step[0] == per_step[2] == [8, 8, 16]  # probed: histories and targets apart (probe.PROBE_FORWARDS)
    log = pd.read_csv(tmp_path / "logs" / "train_log.csv")
    for col in ("wpcl", "crtr", "loss", "alpha", "beta", "w_mean", "margin_t_mean", "margin_v_mean", "gap_mean",
                "image_weak_share", "cos_total_t", "cos_total_v"):
        assert col in log.columns, col
    assert log["cos_total_t"].notna().tolist() == [True, False, True, False]  # steps 0 and 2 probed
    assert log["cos_total_t"].dropna().between(-1, 1).all()
    assert np.allclose(log["loss"], log["wpcl"] + log["crtr"])
    assert (log["w_mean"] >= 1).all()
    weak = pd.read_csv(tmp_path / "logs" / "weak_modality.csv")
    assert len(weak) == 4 * 8 and set(weak["weak"]) <= {"T", "V"}
    assert json.loads((tmp_path / "alpha_beta.json").read_text())["step"] == 4
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


def test_alpha_and_beta_are_kept_non_negative(synth_ds, tiny_path, tmp_path):
    # The loss's gradient on α and β is >= 0, so AdamW walks both down by about lr a step: from 0.2 at
    # lr 0.5 the first step alone would take each to about -0.3. Once β is 0, α's gradient is 0 but
    # Adam's momentum keeps pushing it: the projection has to hold both at 0 at every step.
    cfg = TrainConfig(method="vlm2rec", users_k=32, batch_size=8, max_steps=4, alpha=0.2, beta=0.2, lr=0.5,
                      grad_cos_every=0)
    tr = Trainer(cfg, synth_ds, tmp_path, progress=False)
    tr.train()
    log = pd.DataFrame(tr.log)
    assert (log["alpha"] >= 0).all() and (log["beta"] >= 0).all()
    assert tr.alpha.item() == 0.0 and tr.beta.item() == 0.0
    with pytest.raises(ValueError, match="alpha and beta must be >= 0"):
        TrainConfig(alpha=-0.1)


def test_alpha_and_beta_learn_only_where_the_objective_has_a_penalty(synth_ds, tiny_path, tmp_path):
    for method, learns in (("vlm2rec", True), ("vlm2rec-no-crtr", True), ("vlm2rec-no-stopgrad", True),
                           ("vlm2rec-no-penalty", False), ("vlm2rec-crtr-only", False), ("vlm-sft", False)):
        tr = Trainer(TrainConfig(method=method, users_k=16, batch_size=8, max_steps=1, lr=0.1, grad_cos_every=0),
                     synth_ds, tmp_path / method, progress=False)
        tr.train()
        moved = (tr.alpha.item(), tr.beta.item()) != (1.0, 1.0)
        assert moved == learns, method
    fixed = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, max_steps=1, lr=0.1, grad_cos_every=0,
                                learn_alpha_beta=False), synth_ds, tmp_path / "fixed", progress=False)
    fixed.train()
    assert (fixed.alpha.item(), fixed.beta.item()) == (1.0, 1.0)


def test_nan_loss_stops_with_step_and_term(synth_ds, tiny_path, tmp_path, monkeypatch):
    import vlm2rec_lab.train as train_mod

    def bad(cfg, emb, alpha, beta, labels=None):
        return ObjectiveOutput({"wpcl": emb["z_t"].sum() * 0 + float("nan"), "crtr": emb["z_t"].sum() * 0})

    monkeypatch.setattr(train_mod, "objective", bad)
    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, max_steps=2), synth_ds, tmp_path, progress=False)
    with pytest.raises(TrainingDiverged, match=r"step 1: loss term 'wpcl' is nan"):
        tr.train()


def test_zero_shot_methods_are_not_trained(synth_ds, tmp_path):
    with pytest.raises(ValueError, match="zero-shot"):
        Trainer(TrainConfig(method="vlm-vanilla"), synth_ds, tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(method="nope")


def test_vanilla_run_embeds_and_evaluates(synth_ds, tiny_path, tmp_path):
    res = run_method(synth_ds, TrainConfig(method="vlm-vanilla"), tmp_path / "run", progress=False)
    assert set(res["views"]) == {"f2f", "t2f", "v2f"}
    e = {k: load_embeddings(tmp_path / "run", f"item_{k}") for k in "TVF"}
    assert e["F"].shape == (synth_ds.n_items, 128) and np.allclose(e["F"], e["T"] + e["V"])
    ids = (tmp_path / "run" / "embeddings" / "item_ids.txt").read_text().split()
    assert ids == synth_ds.items["item_id"].tolist()
    # the scorer is the cosine between history and item embeddings
    hist = load_embeddings(tmp_path / "run", "seq_test_histories")
    z = load_embeddings(tmp_path / "run", "seq_test_T")
    sc = EmbeddingScorer(hist, z, e["F"])
    cand = np.stack([synth_ds.targets("test")[:3], synth_ds.negatives(0)[:3, 0]], 1)
    got = sc(hist[:3], cand)
    zn = z[:3] / np.linalg.norm(z[:3], axis=1, keepdims=True)
    fn = e["F"] / np.linalg.norm(e["F"], axis=1, keepdims=True)
    assert np.allclose(got, np.einsum("nd,nmd->nm", zn, fn[cand]), atol=1e-5)
    again = evaluate(synth_ds, sc, seeds=[0], name="t2f", progress=False)  # the run's own training seed's negatives
    assert again.mean()["NDCG@10"] == pytest.approx(res["views"]["t2f"]["sampled"]["mean"]["NDCG@10"])
    tidy = pd.read_csv(tmp_path / "run" / "metrics" / "task1_test_per_seed.csv")
    assert set(tidy["view"]) == {"f2f", "t2f", "v2f"} and set(tidy["seed"]) == {0}  # run 0 on negative set 0 only


def test_embedding_a_run_with_compiled_layers_gives_the_same_embeddings(synth_ds, tiny_path, tmp_path):
    """``embed --compile`` (here with the ``aot_eager`` backend): decoder layers and vision blocks
    compiled, the same item and sequence embeddings."""
    run = create_run(tmp_path / "v", TrainConfig(method="vlm-vanilla"), synth_ds)
    eager = embed_run(run, synth_ds, splits=("test",), progress=False)
    from vlm2rec_lab.runs import load_run_backbone

    backbone = load_run_backbone(run, synth_ds)
    compiled = embed_run(run, synth_ds, splits=("test",), progress=False, backbone=backbone, compile="aot_eager")
    assert all(getattr(layer, "_compiled_call_impl", None) is not None
               for layer in backbone.decoder_layers() + list(backbone.model.visual.blocks))
    assert eager.keys() == compiled.keys()
    for k in eager:
        assert np.allclose(eager[k], compiled[k], atol=1e-5), k


def test_item_mean_pools_normalised_item_embeddings(synth_ds, tiny_path, tmp_path):
    run = create_run(tmp_path / "im", TrainConfig(method="item-mean"), synth_ds)
    out = embed_run(run, synth_ds, splits=("test",), progress=False)
    f = out["item_F"] / np.linalg.norm(out["item_F"], axis=1, keepdims=True)
    h = out["seq_test_histories"][0]
    assert np.allclose(out["seq_test_F"][0], f[h[h >= 0]].mean(0), atol=1e-5)


def test_resume_refuses_a_different_config(synth_ds, tmp_path):
    create_run(tmp_path / "r", TrainConfig(method="vlm-sft", seed=0), synth_ds)
    with pytest.raises(FileExistsError):
        create_run(tmp_path / "r", TrainConfig(method="vlm-sft", seed=0), synth_ds)
    with pytest.raises(ValueError, match="different config"):
        create_run(tmp_path / "r", TrainConfig(method="vlm-sft", seed=1), synth_ds, resume=True)
    # where it computes is not what the run is: a run made on cuda:0 resumes on another device
    create_run(tmp_path / "d", TrainConfig(method="vlm-sft", device="cuda:0"), synth_ds)
    create_run(tmp_path / "d", TrainConfig(method="vlm-sft", device=None), synth_ds, resume=True)
    manifest = load_manifest(tmp_path / "d")
    assert manifest["processes"] == 1 and manifest["resumed_with_processes"] == [1]
    with pytest.raises(ValueError, match=r"different config: \{'lr': \(0.001, 0.5\)\}$"):
        create_run(tmp_path / "d", TrainConfig(method="vlm-sft", device="cpu", lr=0.5), synth_ds, resume=True)
    # nor whether it is compiled (the step log's "compiled" column says which steps were)
    create_run(tmp_path / "d", TrainConfig(method="vlm-sft", speed=SpeedConfig(compile="on")), synth_ds, resume=True)


def test_train_seeds_makes_one_training_run_per_seed_and_compare_pairs_them_by_seed(synth_ds, tiny_path, tmp_path, capsys):
    from scipy.stats import ttest_rel

    from vlm2rec_lab.runsets import find_runs, seed_metrics

    common = ["--data", str(synth_ds.path), "--max-steps", "3", "--batch-size", "8", "--users-k", "16",
              "--grad-cos-every", "0", "--checkpoint-every", "0"]
    assert main(["train", *common, "--method", "vlm-sft", "--seeds", "0-2", "--out", str(tmp_path / "sft")]) == 0
    assert main(["train", *common, "--method", "vlm2rec", "--seeds", "0,1,2", "--out", str(tmp_path / "ours")]) == 0
    out = capsys.readouterr().out
    assert "3 runs in" in out and "mean ± std over training seeds" in out
    sft = find_runs(tmp_path / "sft")
    assert sft == {s: tmp_path / "sft" / f"seed{s}" for s in (0, 1, 2)}
    assert [load_run_config(r).seed for r in sft.values()] == [0, 1, 2]
    # two training seeds are two different runs: other LoRA init and data order, other weights and embeddings
    from safetensors.torch import load_file

    w0, w1 = (load_file(sft[s] / "adapter" / "adapter_model.safetensors") for s in (0, 1))
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)
    assert not np.allclose(load_embeddings(sft[0], "item_F"), load_embeddings(sft[1], "item_F"))
    # run s is evaluated on negative set s only
    assert list(json.loads((sft[1] / "metrics" / "task1_test.json").read_text())["views"]["f2f"]["sampled"]["per_seed"]) == ["1"]
    assert main(["compare", str(tmp_path / "ours"), str(tmp_path / "sft"), "--against", str(tmp_path / "sft"),
                 "--views", "f2f,v2f", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    ours = seed_metrics(find_runs(tmp_path / "ours"), "v2f")
    theirs = seed_metrics(sft, "v2f")
    row = next(r for r in got["v2f"]["summary"] if r["method"] == "ours" and r["metric"] == "NDCG@10")
    assert row["mean"] == pytest.approx(ours["NDCG@10"].mean()) and row["std"] == pytest.approx(ours["NDCG@10"].std(ddof=1))
    assert not np.allclose(ours["NDCG@10"], theirs["NDCG@10"])  # (two objectives, three seeds: never equal in NDCG)
    assert row["p"] == pytest.approx(ttest_rel(ours.loc[[0, 1, 2], "NDCG@10"], theirs.loc[[0, 1, 2], "NDCG@10"]).pvalue)
    assert got["v2f"]["baseline"] == "sft" and set(got["v2f"]["per_seed"]["ours"]) == {"0", "1", "2"}
    assert main(["compare", str(tmp_path / "ours"), "--against", str(tmp_path / "sft"), "--per-seed"]) == 0
    text = capsys.readouterr().out
    assert "paired t-test by training seed against sft" in text and "per training seed" in text
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "nothing: no such run folder or run set" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty")]) == 2
    assert "neither a run folder nor a folder of runs" in capsys.readouterr().err
    # --resume keeps the finished seeds
    assert main(["train", *common, "--method", "vlm-sft", "--seeds", "0-2", "--out", str(tmp_path / "sft"), "--resume"]) == 0
    assert capsys.readouterr().out.count("is finished: kept") == 3
    # a seed without negatives is refused before anything is trained
    assert main(["train", *common, "--method", "vlm-sft", "--seed", "7", "--out", str(tmp_path / "seven")]) == 2
    assert "negatives for seeds [0, 1, 2, 3, 4] only" in capsys.readouterr().err and not (tmp_path / "seven").exists()
    assert main(["train", *common, "--method", "vlm-sft", "--seed", "1", "--seeds", "0-1", "--out", str(tmp_path / "x")]) == 2
    # a set is one config: a run trained otherwise, or a second run of one seed, is refused
    import shutil

    shutil.copytree(sft[2], tmp_path / "sft" / "other")
    with pytest.raises(ValueError, match="two runs with training seed 2"):
        find_runs(tmp_path / "sft")
    shutil.rmtree(tmp_path / "sft" / "other")
    shutil.copytree(sft[2], tmp_path / "mixed" / "a")
    shutil.copytree(tmp_path / "ours" / "seed1", tmp_path / "mixed" / "b")
    with pytest.raises(ValueError, match="differ in more than the seed"):
        find_runs(tmp_path / "mixed")
    # Task 2 from a run set: the embedder's run of seed s initialises the downstream model of seed s
    assert main(["downstream", "--data", str(synth_ds.path), "--model", "gru4rec", "--init", str(tmp_path / "sft"),
                 "--seeds", "0-1", "--epochs", "1", "--json", "--init-transform", "standardize", "--init-eps", "0.5"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["config"]["init_transform"] == "standardize" and res["config"]["init_eps"] == 0.5
    assert {s: v["source"] for s, v in res["init"]["per_seed"].items()} == {
        str(s): str(sft[s] / "embeddings" / "item_F.npy") for s in (0, 1)}


def test_a_zero_shot_method_is_embedded_once_for_every_training_seed(synth_ds, tiny_path, tmp_path, capsys):
    assert main(["train", "--data", str(synth_ds.path), "--method", "vlm-vanilla", "--seeds", "0-1",
                 "--out", str(tmp_path / "vanilla")]) == 0
    capsys.readouterr()
    a, b = (tmp_path / "vanilla" / f"seed{s}" for s in (0, 1))
    np.testing.assert_array_equal(load_embeddings(a, "seq_test_V"), load_embeddings(b, "seq_test_V"))
    per_seed = [json.loads((r / "metrics" / "task1_test.json").read_text())["views"]["f2f"]["sampled"]["per_seed"]
                for r in (a, b)]
    assert list(per_seed[0]) == ["0"] and list(per_seed[1]) == ["1"]  # one model, each seed's own negatives


def test_cli_train_embed_evaluate(synth_ds, tiny_path, tmp_path, capsys):
    run = tmp_path / "cli"
    assert main(["train", "--data", str(synth_ds.path), "--method", "vlm-sft", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "4", "--users-k", "8", "--share-prefix", "on", "--max-pixels", "100352"]) == 0
    out = capsys.readouterr().out
    assert "trained vlm-sft (seed 0) for 2 steps" in out and "v2f (seed 0's negatives):" in out
    assert load_run_config(run).speed.share_prefix is True and load_run_config(run).max_pixels == 100352
    assert load_run_config(run).speed.compile is None  # auto: this CPU run was not compiled
    assert pd.read_csv(run / "logs" / "train_log.csv")["compiled"].tolist() == [False, False]
    from vlm2rec_lab.cli import _parser

    words = {tuple(w): _parser().parse_args(["train", "--data", "d", "--method", "vlm2rec", "--out", "o", *w]).compile
             for w in ((), ("--compile",), ("--compile", "off"), ("--compile", "auto"))}
    assert words == {(): "auto", ("--compile",): "on", ("--compile", "off"): "off", ("--compile", "auto"): "auto"}
    from vlm2rec_lab.runs import load_run_backbone

    assert load_run_backbone(run, synth_ds).image_processor.size["longest_edge"] == 100352  # embedding uses it too
    with pytest.raises(ValueError, match="max_pixels"):
        TrainConfig(max_pixels=0)
    assert main(["embed", str(run)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json", "--seeds", "0-1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["views"]) == {"f2f", "t2f", "v2f"} and set(res["views"]["f2f"]["sampled"]["per_seed"]) == {"0", "1"}
    assert main(["evaluate", "--data", str(synth_ds.path)]) == 2


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_changes_memory_not_numbers(synth_ds, tiny_path, tmp_path, packed):
    """Padded and packed forwards, LoRA dropout on (the recomputation draws the same masks) and the
    gradient-cosine probe at every step (its gradient passes recompute the checkpointed layers too)."""
    kw = dict(method="vlm2rec", users_k=16, batch_size=8, max_steps=2, grad_cos_every=1, checkpoint_every=0,
              lora_dropout=0.1)
    plain = Trainer(TrainConfig(speed=SpeedConfig(packed=packed), **kw), synth_ds, tmp_path / "a", progress=False)
    plain.train()
    ckpt = Trainer(TrainConfig(speed=SpeedConfig(packed=packed, gradient_checkpointing=True), **kw), synth_ds, tmp_path / "b", progress=False)
    ckpt.train()
    assert [r["checkpointing"] for r in ckpt.log] == [1, 1] and [r["checkpointing"] for r in plain.log] == [0, 0]
    for k in ("loss", "cos_total_t", "cos_total_v"):
        assert [r[k] for r in plain.log] == pytest.approx([r[k] for r in ckpt.log], abs=1e-6), k
    a, b = lora_state(plain), lora_state(ckpt)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_gradient_checkpointing_setting_is_every_n_th_layer(synth_ds, tiny_path, tmp_path):
    """``--gradient-checkpointing [EVERY]`` and ``TrainConfig.gradient_checkpointing``: every n-th
    decoder layer from the first step (True / a bare flag: every one; 0: only after running out of
    memory); logged in ``train_log.csv``."""
    from vlm2rec_lab.cli import _parser

    def parse(*a):
        return _parser().parse_args(["train", "--data", "d", "--method", "vlm-sft", "--out", "o", *a]).gradient_checkpointing

    assert (parse(), parse("--gradient-checkpointing"), parse("--gradient-checkpointing", "3")) == (0, 1, 3)
    assert SpeedConfig(gradient_checkpointing=True).gradient_checkpointing == 1 and SpeedConfig().gradient_checkpointing == 0
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        SpeedConfig(gradient_checkpointing=-1)
    tr = Trainer(TrainConfig(method="vlm-sft", users_k=8, batch_size=4, max_steps=1, grad_cos_every=0, checkpoint_every=0,
                             speed=SpeedConfig(gradient_checkpointing=2)), synth_ds, tmp_path, progress=False)
    tr.train()
    layers = tr.backbone.decoder_layers()
    assert len(layers) == 2 and [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert pd.read_csv(tmp_path / "logs" / "train_log.csv")["checkpointing"].tolist() == [2]
    # running out of memory from every 3rd layer: the next rung below, every 2nd
    tr = Trainer(TrainConfig(method="vlm-sft", users_k=8, batch_size=4, max_steps=1, grad_cos_every=0, checkpoint_every=0,
                             speed=SpeedConfig(gradient_checkpointing=3)), synth_ds, tmp_path / "b", progress=False)
    _oom_on_call(tr, 1)
    with pytest.warns(RuntimeWarning, match="every 2nd decoder layer .* --gradient-checkpointing 2 starts there"):
        tr.train()
    assert [r["checkpointing"] for r in tr.log] == [2]


def _oom_on_call(tr, n: int):
    """Make the trainer's ``n``-th micro-batch forward (1-based) raise a device out-of-memory error."""
    real, calls = tr.micro_step, []

    def micro_step(rows, layout=None, **kw):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows, layout, **kw)

    tr.micro_step = micro_step


def test_a_step_that_runs_out_of_memory_is_redone_with_gradient_checkpointing(synth_ds, tiny_path, tmp_path):
    """Checkpointing only as far as memory requires it: the second step's second micro-batch runs out
    of memory, and so does the third step's first; each is redone with more layers checkpointed
    (every 4th, then every 2nd), from the same random state (LoRA dropout on) and without the failed
    try's per-user log, so the run equals one checkpointed from the start."""
    kw = dict(method="vlm2rec", users_k=24, batch_size=4, grad_accum=2, max_steps=3, grad_cos_every=0,
              checkpoint_every=0, lora_dropout=0.1)
    oom = Trainer(TrainConfig(**kw), synth_ds, tmp_path / "a", progress=False)
    real, calls = oom.micro_step, []

    def micro_step(rows, layout=None, **kw):
        calls.append(1)
        if len(calls) in (4, 7):  # step 2's second micro-batch; step 3's first (after step 2's redo)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows, layout, **kw)

    oom.micro_step = micro_step
    with pytest.warns(RuntimeWarning, match="ran out of device memory") as caught:
        oom.train()
    said = [str(w.message) for w in caught if "device memory" in str(w.message)]
    assert len(said) == 2 and said[0].startswith("step 2 ") and said[1].startswith("step 3 ")
    assert "every 4th decoder layer" in said[0] and "every 2nd decoder layer" in said[1]
    assert [r["checkpointing"] for r in oom.log] == [0, 4, 2] and packing.can_pack(oom.backbone)
    ref = Trainer(TrainConfig(speed=SpeedConfig(gradient_checkpointing=True), **kw), synth_ds, tmp_path / "b", progress=False)
    ref.train()
    assert [r["loss"] for r in oom.log] == pytest.approx([r["loss"] for r in ref.log], abs=1e-6)
    assert oom.weak == ref.weak and len(oom.weak) == 3 * 2 * 4
    a, b = lora_state(oom), lora_state(ref)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_out_of_memory_inside_a_packed_forward_unwinds_and_redoes_the_step(synth_ds, tiny_path, tmp_path):
    """The error raised deep inside the second step's packed forward (a LoRA layer's base product,
    within the compute path and the packed attention): every context is left as it was, the step is
    redone, packed, with checkpointing, and the run matches one checkpointed from the start."""
    from vlm2rec_lab.accel import attention

    kw = dict(method="vlm2rec", users_k=16, batch_size=8, max_steps=3, grad_cos_every=0, checkpoint_every=0)
    oom = Trainer(TrainConfig(**kw), synth_ds, tmp_path / "a", progress=False)
    tuner = [m for m in oom.backbone.model.modules() if hasattr(m, "lora_A")]
    base = tuner[3].base_layer
    calls = []

    def forward(x):
        calls.append(1)
        if len(calls) == 2:  # the second step's (packed) forward
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.nn.Linear.forward(base, x)

    base.forward = forward
    with pytest.warns(RuntimeWarning, match="step 2 ran out of device memory"):
        oom.train()
    assert [r["checkpointing"] for r in oom.log] == [0, 4, 4]
    assert not any("forward" in vars(m) for m in tuner) and not oom.backbone.engine.computing
    assert attention._prefix_of.get() is None and attention.packed_state() is None
    ref = Trainer(TrainConfig(speed=SpeedConfig(gradient_checkpointing=True), **kw), synth_ds, tmp_path / "b", progress=False)
    ref.train()
    assert [r["loss"] for r in oom.log] == pytest.approx([r["loss"] for r in ref.log], rel=1e-4)
    a, b = lora_state(oom), lora_state(ref)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-3


def test_out_of_memory_is_not_retried_where_it_cannot_be(synth_ds, tiny_path, tmp_path, monkeypatch):
    """Already checkpointing, or several processes (whose collectives cannot agree on a retry): raised."""
    from vlm2rec_lab.accel import distributed

    kw = dict(method="vlm-sft", users_k=16, batch_size=4, max_steps=2, grad_cos_every=0, checkpoint_every=0)
    tr = Trainer(TrainConfig(speed=SpeedConfig(gradient_checkpointing=True), **kw), synth_ds, tmp_path / "a", progress=False)
    _oom_on_call(tr, 1)
    with pytest.raises(torch.OutOfMemoryError):
        tr.train()
    tr = Trainer(TrainConfig(**kw), synth_ds, tmp_path / "b", progress=False)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    assert not tr.recovery.can_checkpoint_more()


def test_compile_auto_compiles_where_it_was_measured_to_pay():
    """``--compile auto`` (the default): inductor on a CUDA device for a model of 1B+ parameters in a
    run of 2,000+ optimizer steps, unless every layer is checkpointed; nowhere else. On, off and a
    backend's name as said; the words in any case; an unknown backend refused up front."""
    from types import SimpleNamespace

    from vlm2rec_lab.accel.compile import check_compile_backend, compile_backend

    big = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(10**9, device="meta"))])  # (no memory)
    small = torch.nn.ParameterList([torch.nn.Parameter(torch.empty(10**9 - 1, device="meta"))])
    gpu, cpu = torch.device("cuda"), torch.device("cpu")

    def backbone(device=gpu, model=big, checkpoint_every=0):  # 4 decoder layers, every n-th checkpointed
        layers = [SimpleNamespace(gradient_checkpointing=bool(checkpoint_every) and i % checkpoint_every == 0)
                  for i in range(4)]
        return SimpleNamespace(device=device, model=model, decoder_layers=lambda: layers,
                               engine=SimpleNamespace(checkpoint_stride=checkpoint_every or 1))

    assert compile_backend(None, backbone(), 2000) == "inductor"
    assert compile_backend(None, backbone(checkpoint_every=2), 2000) == "inductor"
    assert compile_backend(None, backbone(), 1999) is None
    assert compile_backend(None, backbone(checkpoint_every=1), 10**6) is None
    assert compile_backend(None, backbone(model=small), 10**6) is None
    assert compile_backend(None, backbone(device=cpu), 10**6) is None
    assert compile_backend(True, backbone(device=cpu, model=small), 1) == "inductor"
    assert compile_backend(False, backbone(), 10**6) is None
    assert compile_backend("aot_eager", backbone(device=cpu, model=small), 1) == "aot_eager"
    assert [SpeedConfig(compile=w).compile for w in ("auto", "On", "OFF", "aot_eager")] == [None, True, False, "aot_eager"]
    assert SpeedConfig().compile is None
    for bad in ("", 3):
        with pytest.raises(ValueError, match="compile: auto, on, off"):
            SpeedConfig(compile=bad)
    check_compile_backend("aot_eager")
    with pytest.raises(ValueError, match="'inductr' is not auto, on, off or a torch.compile backend"):
        check_compile_backend("inductr")


def test_compile_error_tells_the_compilers_errors_from_others():
    """An error of a backend, or one AOTAutograd's runtime raises through ``torch._check`` (its
    donated buffers met a backward that retains the graph), is torch.compile's; an operator's error in eager code,
    or out of memory, is not."""
    from vlm2rec_lab.accel.compile import compile_error

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return torch.tanh(self.lin(x)) * 2

    with functorch_config.patch(donated_buffer=True):
        block = Block()
        block.compile(backend="aot_eager", dynamic=True)  # (as compile_layers does)
        loss = block(torch.randn(3, 4)).square().sum()
        with pytest.raises(RuntimeError, match="donated buffers") as twice:
            loss.backward(retain_graph=True)
    assert compile_error(twice.value)
    block = Block()
    block.compile(backend=_broken_backend())
    with pytest.raises(RuntimeError, match="working triton") as broken:
        block(torch.randn(3, 4))
    assert compile_error(broken.value)
    with pytest.raises(RuntimeError) as shapes:
        Block()(torch.randn(3, 5))
    assert not compile_error(shapes.value)
    try:
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
    except torch.OutOfMemoryError as e:
        assert not compile_error(e)


def test_compiled_layers_train_like_uncompiled_ones(synth_ds, tiny_path, tmp_path):
    """``compile`` set (here the ``aot_eager`` backend): the decoder layers run compiled while
    train() runs, the probed steps included (their gradient passes run a backward more than once,
    which AOTAutograd's donated buffers, on here as by default, would forbid), the run logs the same
    losses and cosines as an uncompiled one, and the layers are uncompiled when train() returns
    (embedding afterwards is eager unless asked)."""
    kw = dict(method="vlm2rec", users_k=16, batch_size=8, max_steps=3, grad_cos_every=2, checkpoint_every=0)
    seen = []
    tr = Trainer(TrainConfig(speed=SpeedConfig(compile="aot_eager"), **kw), synth_ds, tmp_path / "a", progress=False,
                 on_step=lambda step: seen.append((tr.recovery.backend, [layer._compiled_call_impl is not None
                                                                 for layer in tr.backbone.decoder_layers()])))
    with functorch_config.patch(donated_buffer=True):  # (restored afterwards: compile_layers turns it off)
        tr.train()
    assert seen == [("aot_eager", [True, True])] * 3
    assert tr.recovery.backend is None and not any(layer._compiled_call_impl for layer in tr.backbone.decoder_layers())
    ref = Trainer(TrainConfig(speed=SpeedConfig(compile="off"), **kw), synth_ds, tmp_path / "b", progress=False)
    ref.train()
    assert [r["compiled"] for r in tr.log] == [True] * 3 and [r["compiled"] for r in ref.log] == [False] * 3
    assert [r["loss"] for r in tr.log] == pytest.approx([r["loss"] for r in ref.log], abs=1e-5)
    assert [r["cos_total_t"] for r in tr.log[::2]] == pytest.approx([r["cos_total_t"] for r in ref.log[::2]], abs=1e-4)


def _broken_backend() -> str:
    """A torch.compile backend that fails as inductor does without a working triton (registered once)."""
    import torch._dynamo

    name = "vlm2rec_test_broken"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        @torch._dynamo.register_backend(name=name)
        def broken(gm, example_inputs):
            raise RuntimeError("Cannot find a working triton installation (simulated)")
    return name


LATE: dict = {"trainer": None, "weak_rows_then": None}


def _late_failing_backend() -> str:
    """A backend whose graphs run as traced until ``LATE["trainer"]`` has logged per-user rows (its
    first micro-batch is done); the next call fails, once, as inductor does when it finds no working
    C++ compiler (registered once)."""
    import torch._dynamo
    from torch._inductor.exc import CppCompileError

    name = "vlm2rec_test_fails_late"
    if name not in torch._dynamo.list_backends(exclude_tags=()):
        @torch._dynamo.register_backend(name=name)
        def late(gm, example_inputs):
            def run(*args):
                tr = LATE["trainer"]
                if tr is not None and tr.weak and LATE["weak_rows_then"] is None:
                    LATE["weak_rows_then"] = len(tr.weak)
                    raise CppCompileError(["c++"], "simulated: no working C++ compiler")
                return gm.forward(*args)
            return run
    return name


def test_a_step_torch_compile_fails_on_is_redone_uncompiled(synth_ds, tiny_path, tmp_path):
    """A compiled graph fails in the second micro-batch of the first step, after the first one drew
    its LoRA-dropout masks, logged its per-user rows and ran its backward: the step is redone from
    its start with the layers uncompiled (the random state rewound, those rows dropped), a warning
    says why, and the run equals one never compiled. Where a retry cannot be agreed on (several
    processes) the error is raised, with a note on how to train without compiling."""
    kw = dict(method="vlm2rec", users_k=16, batch_size=4, grad_accum=2, max_steps=3, grad_cos_every=2,
              checkpoint_every=0, lora_dropout=0.1)
    tr = Trainer(TrainConfig(speed=SpeedConfig(compile=_late_failing_backend()), **kw), synth_ds, tmp_path / "a", progress=False)
    LATE.update(trainer=tr, weak_rows_then=None)
    with pytest.warns(RuntimeWarning, match=r"step 1: torch.compile \(vlm2rec_test_fails_late\) raised an error, so "
                                            r"the 2 compiled decoder layers run uncompiled .*no working C\+\+ compiler"):
        tr.train()
    LATE["trainer"] = None
    assert LATE["weak_rows_then"] == 4  # the first micro-batch's rows were in the log when it failed
    assert tr.recovery.backend is None and all(layer._compiled_call_impl is None for layer in tr.backbone.decoder_layers())
    ref = Trainer(TrainConfig(speed=SpeedConfig(compile=False), **kw), synth_ds, tmp_path / "b", progress=False)
    ref.train()
    assert [r["compiled"] for r in tr.log] == [False] * 3
    assert [r["loss"] for r in tr.log] == pytest.approx([r["loss"] for r in ref.log], abs=1e-6)
    assert tr.weak == ref.weak and len(tr.weak) == 3 * 8
    a, b = lora_state(tr), lora_state(ref)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    import torch._dynamo

    torch._dynamo.reset()  # (else the layers' code would find the graphs compiled above)
    tr = Trainer(TrainConfig(speed=SpeedConfig(compile=_broken_backend()), **kw), synth_ds, tmp_path / "c", progress=False)
    tr.recovery.can_go_eager = lambda: False  # (as with several processes)
    with pytest.raises(RuntimeError, match="working triton") as raised:
        tr.train()
    assert tr.recovery.backend is None and all(layer._compiled_call_impl is None for layer in tr.backbone.decoder_layers())
    if sys.version_info >= (3, 11):
        assert "--compile off trains without it" in "".join(raised.value.__notes__)


def test_packed_steps_train_like_padded_ones(synth_ds, tiny_path, tmp_path):
    """The four prompt sets of a step packed into one forward: the same losses and LoRA weights as
    padded forwards, up to float rounding, over a few optimizer steps."""
    kw = dict(method="vlm2rec", users_k=16, batch_size=8, max_steps=3, grad_cos_every=0, checkpoint_every=0)
    plain = SpeedConfig(packed=False, share_prefix=False, cache_vision=False, fused=False, merge_adapters=False,
                        compile=False, image_workers=0)  # every speed switch off: the plain Hugging Face forward
    runs = {}
    for name, speed in (("padded", SpeedConfig(packed=False)), ("packed", SpeedConfig()), ("plain", plain)):
        runs[name] = Trainer(TrainConfig(speed=speed, **kw), synth_ds, tmp_path / name, progress=False)
        runs[name].train()
    for name in ("padded", "plain"):
        assert [r["loss"] for r in runs[name].log] == pytest.approx([r["loss"] for r in runs["packed"].log], rel=1e-4)
        a, b = lora_state(runs[name]), lora_state(runs["packed"])
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-3


def test_a_config_with_the_speed_switches_at_the_top_level_still_loads(tmp_path):
    """Run folders written before ``TrainConfig.speed`` hold the switches at the top level of
    config.yaml: they load into the speed section; a config saved now round-trips."""
    from vlm2rec_lab.config import load_yaml, save_yaml

    old = tmp_path / "config.yaml"
    old.write_text("method: vlm-sft\npacked: false\ncompile: 'off'\ngradient_checkpointing: true\nshare_prefix: null\n"
                   "cache_vision: true\nlr: 0.5\n")
    cfg = load_yaml(TrainConfig, old)
    assert cfg.speed == SpeedConfig(packed=False, compile=False, gradient_checkpointing=1) and cfg.lr == 0.5
    save_yaml(cfg, tmp_path / "new.yaml")
    assert load_yaml(TrainConfig, tmp_path / "new.yaml") == cfg
    both = tmp_path / "both.yaml"
    both.write_text("method: vlm-sft\npacked: false\nspeed: {packed: true}\n")
    with pytest.raises(ValueError, match=r"\['packed'\] given both at the top level and under speed"):
        load_yaml(TrainConfig, both)


def test_gradient_accumulation_counts_optimizer_steps(synth_ds, tiny_path, tmp_path):
    tr = Trainer(TrainConfig(method="vlm-sft", users_k=40, batch_size=4, grad_accum=2, epochs=1, grad_cos_every=0,
                             checkpoint_every=0), synth_ds, tmp_path, progress=False)
    tr.train()
    assert tr.steps_per_epoch == 5 and tr.step == 5  # 40 examples / (4 x 2)


def test_a_text_only_llm_by_local_path(synth_ds, tiny_path, tmp_path):
    """Any HF LLM by path: a small Qwen2 saved here loads as kind 'llm' and trains llm-sft."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from vlm2rec_lab.backbones import load_backbone
    from vlm2rec_lab.encoder import Encoder

    tok = AutoTokenizer.from_pretrained(tiny_path)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id))
    path = tmp_path / "llm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    backbone = load_backbone(str(path), device="cpu")
    assert backbone.kind == "llm" and backbone.image_processor is None and backbone.hidden_size == 64
    assert Encoder(backbone, synth_ds.items).item_embeddings("T", [0, 1]).shape == (2, 64)
    res = run_method(synth_ds, TrainConfig(method="llm-sft", backbone=str(path), max_steps=2, users_k=16, batch_size=8),
                     tmp_path / "run", progress=False)
    assert set(res["views"]) == {"f2f"}
    with pytest.raises(ValueError, match="fusion"):
        run_method(synth_ds, TrainConfig(method="vlm-sft", backbone=str(path), max_steps=1, users_k=8, batch_size=4),
                   tmp_path / "bad", progress=False)


def test_the_next_micro_batch_is_laid_out_ahead_and_changes_nothing(synth_ds, tiny_path, tmp_path, monkeypatch):
    """Each micro-batch's token layout is worked out while the previous one's backward runs: once per
    micro-batch (grad_accum 2, across an epoch boundary), used for exactly the examples it was made
    for, and the run equals one that lays out every micro-batch when it comes (bitwise on the CPU)."""
    from vlm2rec_lab.encoder import Encoder

    # 24 users x 1 example / (batch 4 x accumulation 2) = 3 steps an epoch; 5 steps cross into epoch 2
    kw = dict(method="vlm2rec", users_k=24, batch_size=4, grad_accum=2, max_steps=5, grad_cos_every=0,
              checkpoint_every=0, lora_dropout=0.1)
    plain = Trainer(TrainConfig(**kw), synth_ds, tmp_path / "plain", progress=False)
    monkeypatch.setattr(plain, "_upcoming", lambda a, order: None)  # nothing laid out ahead
    plain.train()

    calls, used = [], []
    real_layout, real_micro = Encoder.layout, Trainer.micro_step

    def layout(self, requests):
        calls.append([lst for kind, lists in requests if kind == "T" for lst in lists])
        return real_layout(self, requests)

    def micro_step(self, rows, layout=None, **kw):
        used.append(layout is not None)
        if layout is not None:  # the layout is these examples' own
            own = self.local_rows(rows)
            fresh = real_layout(self.encoder, self.requests(self.hist[own], self.targets[own]))
            assert (layout.sizes, layout.kinds, layout.counts) == (fresh.sizes, fresh.kinds, fresh.counts)
            assert all(torch.equal(x, y) for x, y in zip(layout.sequences, fresh.sequences))
            assert all(torch.equal(x, y) for x, y in zip(layout.positions, fresh.positions))
        return real_micro(self, rows, layout, **kw)

    monkeypatch.setattr(Encoder, "layout", layout)
    monkeypatch.setattr(Trainer, "micro_step", micro_step)
    ahead = Trainer(TrainConfig(**kw), synth_ds, tmp_path / "ahead", progress=False)
    ahead.train()
    assert ahead.epoch == 1 and len(used) == 10
    assert used == [False] + [True] * 9 and len(calls) == 10  # the first is laid out when it comes, no layout twice
    assert [r["loss"] for r in ahead.log] == [r["loss"] for r in plain.log]
    a, b = lora_state(plain), lora_state(ahead)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_layout_made_for_other_examples_is_not_used(synth_ds, tiny_path, tmp_path, monkeypatch):
    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, max_steps=1, grad_cos_every=0, checkpoint_every=0),
                 synth_ds, tmp_path, progress=False)
    first = tr.order(0)[:8]
    other = tr.order(0)[8:16]
    own = tr.local_rows(other)
    tr.lookahead = (other, tr.encoder.layout(tr.requests(tr.hist[own], tr.targets[own])))
    seen, real = [], Trainer.micro_step
    monkeypatch.setattr(Trainer, "micro_step", lambda self, rows, layout=None, **kw: seen.append((rows, layout)) or real(self, rows, layout, **kw))
    tr.train()
    (rows, layout), = seen
    assert np.array_equal(rows, first) and layout is None


def test_divergence_is_reported_before_a_failing_look_ahead(synth_ds, tiny_path, tmp_path, monkeypatch):
    """The next micro-batch is laid out before this one's loss is read back; an error there (an
    unreadable image, say) must not hide a non-finite loss: it is raised in its own turn."""
    import vlm2rec_lab.train as train_mod
    from vlm2rec_lab.encoder import Encoder

    def bad(cfg, emb, alpha, beta, labels=None):
        return ObjectiveOutput({"wpcl": emb["z_t"].sum() * 0 + float("nan"), "crtr": emb["z_t"].sum() * 0})

    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, max_steps=2, grad_cos_every=0), synth_ds,
                 tmp_path, progress=False)
    real, calls = Encoder.layout, []

    def layout(self, requests):
        calls.append(1)
        if len(calls) == 2:  # the look-ahead for step 2
            raise ValueError("x.png: the image of item_idx 3 cannot be read")
        return real(self, requests)

    monkeypatch.setattr(Encoder, "layout", layout)
    monkeypatch.setattr(train_mod, "objective", bad)
    with pytest.raises(TrainingDiverged, match=r"step 1: loss term 'wpcl' is nan"):
        tr.train()
    assert len(calls) == 2 and tr.lookahead is None


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_gradient_cosines_reuse_the_steps_backward(synth_ds, tiny_path, tmp_path, grad_accum):
    """cos(g_total, g_T) and cos(g_total, g_V) with g_total read from the step's own backward (scaled
    by 1 / grad_accum) equal the cosines with g_total from a separate gradient pass of the objective."""
    from vlm2rec_lab.probe import flat_cosine, modality_gradients, objective_modality_cosines

    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, grad_accum=grad_accum, max_steps=1,
                             grad_cos_every=1, lora_dropout=0.0), synth_ds, tmp_path, progress=False)
    for n, p in tr.backbone.model.named_parameters():  # LoRA B starts at zero: give the gradients some spread
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(n)))
    tr.backbone.model.train()
    rows = tr.order(0)[:8]
    out, emb, labels = tr.micro_step(rows)
    g_mod = modality_gradients(emb, labels, tr.lora, tr.cfg.tau)
    g_sep = torch.autograd.grad(out.total, tr.lora, retain_graph=True, allow_unused=True)
    want = {"cos_total_t": flat_cosine(g_sep, g_mod[0]), "cos_total_v": flat_cosine(g_sep, g_mod[1])}
    tr.opt.zero_grad(set_to_none=True)
    (out.total / grad_accum).backward()
    got = objective_modality_cosines(g_mod, [p.grad for p in tr.lora])
    assert got == pytest.approx(want, abs=1e-6)
    assert abs(want["cos_total_t"] - want["cos_total_v"]) > 1e-3  # two different directions
    # a probed micro-batch (histories and targets in forwards of their own): the same cosines
    out, emb, labels = tr.micro_step(rows, probed=True)
    g_mod = modality_gradients(emb, labels, tr.lora, tr.cfg.tau)
    g_sep = torch.autograd.grad(out.total, tr.lora, allow_unused=True)
    assert {"cos_total_t": flat_cosine(g_sep, g_mod[0]), "cos_total_v": flat_cosine(g_sep, g_mod[1])} == pytest.approx(want, abs=1e-5)
    a, b = [torch.randn(5), None, torch.randn(3)], [torch.randn(5), torch.randn(2), torch.randn(3)]
    flat = lambda v: torch.cat([v[0], v[2]])  # noqa: E731
    assert flat_cosine(a, b) == pytest.approx(float(torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0)), abs=1e-6)


def test_checkpoints_are_written_in_the_background_from_a_snapshot(synth_ds, tiny_path, tmp_path, monkeypatch):
    """save_checkpoint returns before the disk write; the checkpoint holds the state as it was when
    it was taken (training goes on meanwhile), and a failed write is raised, not lost."""
    import threading

    import vlm2rec_lab.train as train_mod

    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, max_steps=1, grad_cos_every=0, checkpoint_every=0),
                 synth_ds, tmp_path, progress=False)
    tr.train()
    before, alpha = lora_state(tr), tr.alpha.item()
    moments = {k: v.clone() for k, v in tr.opt.state[tr.lora[0]].items()}  # AdamW's state_dict holds references
    gate, real_save = threading.Event(), torch.save
    monkeypatch.setattr(train_mod.torch, "save", lambda *a, **kw: (gate.wait(10), real_save(*a, **kw)))
    tr.save_checkpoint()  # returns while the write waits on the gate
    assert not tr.checkpoints.pending.done()
    with torch.no_grad():  # training goes on: the weights change in place
        for p in tr.lora:
            p.add_(1.0)
        tr.alpha.add_(1.0)
        for v in tr.opt.state[tr.lora[0]].values():
            v.add_(1.0)
    gate.set()
    tr.checkpoints.wait()
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    assert all(torch.equal(state["lora"][k], before[k]) for k in before) and state["alpha"].item() == alpha
    saved = state["optimizer"]["state"][0]
    assert saved.keys() == moments.keys() and all(torch.equal(saved[k], moments[k]) for k in moments)

    def broken(*a, **kw):
        raise OSError("No space left on device")

    monkeypatch.setattr(train_mod.torch, "save", broken)
    tr.save_checkpoint()
    with pytest.raises(OSError, match="No space left"):
        tr.checkpoints.wait()
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 1  # the last good one stays


def test_a_failed_checkpoint_write_does_not_hide_why_training_stopped(synth_ds, tiny_path, tmp_path, monkeypatch):
    import time

    import vlm2rec_lab.train as train_mod

    calls = []

    def nan_at_step_2(cfg, emb, alpha, beta, labels=None):
        calls.append(1)
        bad = float("nan") if len(calls) == 2 else 0.0
        return ObjectiveOutput({"wpcl": emb["z_t"].sum() * 0 + bad, "crtr": emb["z_t"].sum() * 0})

    def slow_broken_save(*a, **kw):
        time.sleep(0.5)
        raise OSError("No space left on device")

    monkeypatch.setattr(train_mod, "objective", nan_at_step_2)
    monkeypatch.setattr(train_mod.torch, "save", slow_broken_save)
    tr = Trainer(TrainConfig(method="vlm2rec", users_k=16, batch_size=8, max_steps=3, checkpoint_every=1, grad_cos_every=0),
                 synth_ds, tmp_path, progress=False)
    with pytest.warns(RuntimeWarning, match="No space left"), pytest.raises(TrainingDiverged, match="step 2"):
        tr.train()


def test_the_logged_gradient_cosines_are_those_of_a_separate_gradient_pass(synth_ds, tiny_path, tmp_path, monkeypatch):
    """End to end through the trainer (gradient accumulation 2, LoRA dropout on): each probed step's
    logged cosines equal those computed with g_total from its own gradient pass of the objective on
    the step's first micro-batch."""
    import vlm2rec_lab.train as train_mod
    from vlm2rec_lab import probe
    from vlm2rec_lab.probe import flat_cosine

    tr = Trainer(TrainConfig(method="vlm2rec", users_k=32, batch_size=8, grad_accum=2, max_steps=2, grad_cos_every=1,
                             checkpoint_every=0, lora_dropout=0.2), synth_ds, tmp_path, progress=False)
    want, real = [], probe.modality_gradients

    def modality_gradients(emb, labels, params, tau):
        total = train_mod.objective(tr.obj, emb, tr.alpha, tr.beta, labels=labels).total
        g_total = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        g_t, g_v = real(emb, labels, params, tau)
        want.append({"cos_total_t": flat_cosine(g_total, g_t), "cos_total_v": flat_cosine(g_total, g_v)})
        return g_t, g_v

    monkeypatch.setattr(probe, "modality_gradients", modality_gradients)
    tr.train()
    got = [{k: r[k] for k in ("cos_total_t", "cos_total_v")} for r in tr.log]
    assert len(want) == 2 and got == [pytest.approx(w, abs=1e-6) for w in want]
