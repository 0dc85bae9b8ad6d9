"""The training-step figures of ``gpu_bench.py``: the plain Hugging Face step against the project's
variants (:data:`TRAIN_VARIANTS`), side by side on the same batches and weights; the longest step
an epoch can hold, the epochs they make, and the compiled step.
"""
from __future__ import annotations

import time

import torch
from common import BEAUTY_USERS, count_syncs, peak_gib, profile_step, reset_peak, settle, sync
from gpu_embedding import Shapes, plain_hidden, project_embedding, project_hidden, project_packed, vision_features

# (name, embedding path, checkpoint every n-th decoder layer (0: none), LoRA dropout: "paper" for the
# paper's), in the order they run
VARIANTS = (("plain_ckpt", "plain", 1, 0.0), ("plain", "plain", 0, 0.0),
            ("project_unpacked_peft_cast", "unpacked", 0, 0.0),  # cache only: four padded forwards, fp32 LoRA
            ("project_unpacked", "unpacked", 0, 0.0),  # + bf16 LoRA under autocast
            ("project_packed", "packed", 0, 0.0),  # + the four prompt sets packed into one forward
            ("project", "project", 0, 0.0),  # + each prompt kind's shared prefix computed once
            ("project_sdpa", "project", 0, 0.0),  # project with grouped SDPA instead of the default kernel
            ("project_probe", "project", 0, 0.0),  # project, with the trainer's gradient-cosine probe every step
            # the trainer's defaults: the paper's LoRA dropout, and so no shared prefixes (each prompt
            # draws its own masks), with and without the probe; then what the trainer falls back to
            # when a step runs out of memory: checkpointing every 4th layer, and (the last rung) every
            # layer, packed all the same
            ("project_paper", "packed", 0, "paper"),
            ("project_paper_probe", "packed", 0, "paper"),
            ("project_paper_sdpa", "packed", 0, "paper"),
            ("project_paper_ckpt4", "packed", 4, "paper"),
            ("project_paper_ckpt", "packed", 1, "paper"))
TRAIN_VARIANTS = tuple(v[0] for v in VARIANTS)

# the variants whose device syncs a step are counted (one more step under CUDA's sync debug mode)
SYNC_COUNTED = ("project", "project_paper", "project_paper_probe")


def add_lora(model):
    """LoRA (rank 16) on the language model with the paper's dropout -> the PEFT model. The
    variants without dropout set its p to 0 (PEFT makes no dropout layer at all for 0, so that the
    paper's variants could not have one); it starts at 0."""
    from peft import LoraConfig, get_peft_model

    from vlm2rec_lab.backbones import lora_target_regex
    from vlm2rec_lab.config import PAPER_DEFAULTS

    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=PAPER_DEFAULTS["lora_dropout"],
                                            target_modules=lora_target_regex("vlm")))
    assert lora_dropouts(peft), "no LoRA dropout layers found"
    set_lora_dropout(peft, 0.0)
    return peft


def lora_dropouts(peft) -> list[torch.nn.Dropout]:
    return [m for n, m in peft.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n]


def set_lora_dropout(peft, p: float) -> None:
    for m in lora_dropouts(peft):
        m.p = p


class TrainingBench:
    """A training step's four embedding paths over the same batches and weights, and the figures
    timed with them.

    Args:
        model: the Qwen2.5-VL model, LoRA applied (``peft``, the PEFT model around it).
        backbone: the project's :class:`~vlm2rec_lab.backbones.Backbone` over ``model.model``.
        shapes: the Beauty-shaped prompts; ``n_items``: how many items histories draw from.
        steps: timed steps a figure; ``vary``: histories of 3 to 10 items instead of 7.
    """

    def __init__(self, model, peft, backbone, shapes: Shapes, n_items: int, steps: int, vary: bool, device, emit):
        from vlm2rec_lab.config import PAPER_DEFAULTS
        from vlm2rec_lab.losses import ObjectiveConfig
        from vlm2rec_lab.probe import PROBE_FORWARDS

        assert [r for group in PROBE_FORWARDS for r in group] == [0, 1, 2, 3]  # (step() relies on this order)
        self.model, self.peft, self.backbone, self.shapes = model, peft, backbone, shapes
        self.steps, self.device, self.emit = steps, device, emit
        self.paper_dropout = PAPER_DEFAULTS["lora_dropout"]
        self.params = [p for p in peft.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, fused=True)  # as the trainer's
        self.obj = ObjectiveConfig(name="vlm2rec")
        self.gen = torch.Generator().manual_seed(1)
        self.batches = [self._batch(n_items, vary) for _ in range(steps + 1)]
        self.n_tokens = sum(shapes.batch(k, lst)["attention_mask"].sum().item() for k in ("T", "V") for lst in self.batches[0])
        with torch.no_grad():
            self.all_items = sorted({i for h, t in self.batches for lst in h + t for i in lst})
            self.feats = vision_features(backbone, shapes, self.all_items)
        self.queued: list[float] = []  # per step: host seconds until all its work was queued (before its read-back)
        feats = self.feats
        self.paths = {  # a step's four prompt sets -> their embeddings
            "plain": lambda reqs: [plain_hidden(peft, shapes, shapes.batch(k, lst)) for k, lst in reqs],
            "unpacked": lambda reqs: [project_hidden(backbone, feats, shapes.batch(k, lst)) for k, lst in reqs],
            "packed": lambda reqs: project_packed(backbone, feats, shapes, reqs, share_prefix=False),
            "project": lambda reqs: project_packed(backbone, feats, shapes, reqs),
        }

    def _batch(self, n_items: int, vary: bool) -> tuple[list, list]:
        """8 users' histories and targets."""
        g = self.gen
        if vary:  # Beauty-like spread: 3 to 10 items (mean about 7)
            hist = [torch.randint(0, n_items, (int(torch.randint(3, 11, (1,), generator=g)),), generator=g).tolist()
                    for _ in range(8)]
        else:
            hist = torch.randint(0, n_items, (8, 7), generator=g).tolist()
        tgt = torch.randint(0, n_items, (8,), generator=g).tolist()
        return hist, [[t] for t in tgt]

    def step(self, path: str, batch, do_step: bool = True, probe: bool = False) -> float:
        """One training step on ``batch`` through embedding path ``path`` -> its loss: the VLM2Rec
        objective, and where ``do_step``, backward and an optimizer step; with ``probe``, the
        trainer's gradient-cosine probe (histories and targets in forwards of their own)."""
        from vlm2rec_lab.losses import objective
        from vlm2rec_lab.probe import PROBE_FORWARDS, modality_gradients, objective_modality_cosines

        t0 = time.perf_counter()
        hist, tgt = batch
        sets_fn = self.paths[path]
        requests = [("T", hist), ("V", hist), ("T", tgt), ("V", tgt)]
        if probe:
            z_t, z_v, e_t, e_v = [z for group in PROBE_FORWARDS for z in sets_fn([requests[r] for r in group])]
        else:
            z_t, z_v, e_t, e_v = sets_fn(requests)
        emb = {k: v.float() for k, v in {"z_t": z_t, "z_v": z_v, "e_t": e_t, "e_v": e_v}.items()}
        loss = objective(self.obj, emb).total
        if do_step:
            self.opt.zero_grad(set_to_none=True)
            g_mod = modality_gradients(emb, None, self.params, self.obj.tau) if probe else None  # the trainer's probe
            loss.backward()
            if probe:
                objective_modality_cosines(g_mod, [p.grad for p in self.params])
            self.opt.step()
        self.queued.append(time.perf_counter() - t0)
        return loss.item()

    def loss_agreement(self) -> None:
        """The plain step's loss against the project's (packed, mixed precision on a GPU), no update."""
        from vlm2rec_lab.accel.attention import set_vision_attention

        with torch.no_grad():
            set_vision_attention(self.model, varlen=False)
            l_plain = self.step("plain", self.batches[0], False)
            set_vision_attention(self.model, varlen=True)
            l_proj = self.step("project", self.batches[0], False)
        self.emit(figure="train_loss_agreement", plain=round(l_plain, 5), project=round(l_proj, 5),
                  rel_diff=round(abs(l_plain - l_proj) / abs(l_plain), 6), tokens_per_step=int(self.n_tokens))

    def variants(self, names: list[str] | None) -> dict[str, float]:
        """Each of :data:`VARIANTS` (those in ``names``, where given): seconds a step after one
        warm-up step, emitted with the Beauty epoch it makes; out of memory is a figure too.
        Returns seconds a step by variant."""
        from vlm2rec_lab.accel.attention import set_varlen_kernel, set_vision_attention, varlen_kernel
        from vlm2rec_lab.accel.checkpointing import checkpointed_every, enable_checkpointing

        default_kernel = varlen_kernel()
        results = {}
        for name, path, every, dropout in VARIANTS:
            if names and name not in names:
                continue
            dropout = self.paper_dropout if dropout == "paper" else dropout
            set_lora_dropout(self.peft, dropout)
            set_vision_attention(self.model, varlen=not name.startswith("plain"))
            self.backbone.engine.fused = not name.endswith("peft_cast")
            set_varlen_kernel("sdpa" if name.endswith("_sdpa") else default_kernel)
            self.model.model.activation_checkpointing_disable()
            if every and name.startswith("plain"):  # Hugging Face's own checkpointing
                self.model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            elif every:
                enable_checkpointing(self.backbone, every)
            self.peft.train()
            probe = name.endswith("_probe")
            try:
                s, host, syncs = self._time(path, probe, count=name in SYNC_COUNTED)
            except torch.OutOfMemoryError:
                self.opt.zero_grad(set_to_none=True)
                self.emit(figure="train_step", path=name, oom=True, peak_gib=peak_gib(self.device))
                torch.cuda.empty_cache()
                continue
            results[name] = s
            self.emit(figure="train_step", path=name, seconds=round(s, 3), beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1),
                      checkpointing=checkpointed_every(self.backbone), checkpoint_every=every, lora_dropout=dropout,
                      dropout_active=self.backbone.engine.dropout_active, peak_gib=peak_gib(self.device),
                      host_queue_s=round(host, 3), host_share=round(host / s, 2), syncs=syncs)
        set_varlen_kernel(default_kernel)
        return results

    def _time(self, path: str, probe: bool, count: bool) -> tuple[float, float, int | None]:
        """Seconds a step and host seconds a step (after a warm-up step), and the device syncs of
        one more step where ``count``."""
        device = self.device
        self.step(path, self.batches[0], probe=probe)  # warm-up
        settle(device); reset_peak(device); self.queued.clear(); t = time.perf_counter()
        for b in self.batches[1:]:
            self.step(path, b, probe=probe)
        sync(device)
        s, host = (time.perf_counter() - t) / self.steps, sum(self.queued) / len(self.queued)
        syncs = count_syncs(lambda: self.step(path, self.batches[1], probe=probe), device) if count else None
        return s, host, syncs

    def longest_step(self) -> None:
        """The longest step an epoch can hold (every history at the 10-item cap) at the trainer's
        defaults: its peak memory, and where it does not fit, the fallback's rungs."""
        from vlm2rec_lab.accel.checkpointing import enable_checkpointing

        pool = torch.tensor(self.all_items)
        pick = lambda n: pool[torch.randint(0, len(pool), (n,), generator=self.gen)].tolist()  # noqa: E731
        longest = ([pick(10) for _ in range(8)], [[i] for i in pick(8)])
        tokens = sum(self.shapes.batch(k, lst)["attention_mask"].sum().item() for k in ("T", "V") for lst in longest)
        set_lora_dropout(self.peft, self.paper_dropout)
        for every in (0, 4, 2, 1):
            self.model.model.activation_checkpointing_disable()
            if every:
                enable_checkpointing(self.backbone, every)
            try:
                reset_peak(self.device)
                self.step("packed", longest)  # (warm-up)
                settle(self.device); t = time.perf_counter()
                self.step("packed", longest)
                sync(self.device)
            except torch.OutOfMemoryError:
                self.opt.zero_grad(set_to_none=True)
                self.emit(figure="train_step_longest", path="project_paper", checkpoint_every=every, tokens=int(tokens), oom=True)
                torch.cuda.empty_cache()
                continue
            self.emit(figure="train_step_longest", path="project_paper", checkpoint_every=every, tokens=int(tokens),
                      seconds=round(time.perf_counter() - t, 3), peak_gib=peak_gib(self.device))
            break

    def epoch_figures(self, results: dict[str, float]) -> None:
        """The step ratios against ``project``, and the epochs with the trainer's default probing
        (every 10th step) with and without the paper's dropout."""
        if "project" in results:
            self.emit(figure="train_step_ratio", **{f"vs_{k}": round(v / results["project"], 2)
                                                    for k, v in results.items() if k != "project"})
        for base, figure, dropout in (("project", "train_epoch_with_probe", 0.0),
                                      ("project_paper", "train_epoch_at_defaults", self.paper_dropout)):
            if base in results and f"{base}_probe" in results:
                s = (9 * results[base] + results[f"{base}_probe"]) / 10
                self.emit(figure=figure, grad_cos_every=10, lora_dropout=dropout, shared_prefixes=base == "project",
                          seconds_per_step=round(s, 3), beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1),
                          vs_plain_ckpt=round(results["plain_ckpt"] / s, 2) if "plain_ckpt" in results else None,
                          probe_step_vs_step=round(results[f"{base}_probe"] / results[base], 2))

    def profile(self, dtype) -> None:
        """Where the step at the trainer's defaults spends its time, and the packed language-model probe."""
        set_lora_dropout(self.peft, self.paper_dropout)
        profile_step(lambda: self.step("packed", self.batches[1]), self.device, self.emit)
        set_lora_dropout(self.peft, 0.0)
        packed_probe(self.peft, self.n_tokens, self.steps, self.device, dtype, self.emit)

    def compiled(self, backend: str, results: dict[str, float], a, plain_rate: float | None) -> None:
        """The compiled figures, last (compiling changes the layers in place): the project step
        compiled; item embedding with the vision blocks compiled too (unless ``a.train_only``); then
        the trainer's defaults compiled (the paper's LoRA dropout, no shared prefixes: a dropout
        rate is a constant of the compiled graphs, so the layers compile again). That step's loss
        cannot be compared with the eager step's: the compiled graphs draw other dropout masks."""
        from vlm2rec_lab.accel.compile import compile_layers

        compiled_step(self.backbone, lambda b, do_step=True: self.step("project", b, do_step), self.batches, self.steps,
                      self.device, self.emit, results.get("plain_ckpt"), backend=backend, eager_s=results.get("project"))
        if not a.train_only:  # without LoRA's adapters, as the eager item embedding ran (before LoRA was
            # applied; with them on, each adapted projection adds its rank-16 products)
            compile_layers(self.backbone, backend=backend, vision=True)
            with torch.inference_mode(), self.peft.disable_adapter():
                rate, _ = project_embedding(self.backbone, self.shapes, a.project_items, a.embed_batch, self.device,
                                            self.emit, path="project_compiled", warm_items=(8, min(a.project_items, 256 + 8)))
            self.emit(figure="item_embedding_ratio", path="project_compiled", ratio=round(rate / plain_rate, 2))
        set_lora_dropout(self.peft, self.paper_dropout)
        probe_ratio = (results["project_paper_probe"] / results["project_paper"]
                       if "project_paper_probe" in results and "project_paper" in results else None)
        compiled_step(self.backbone, lambda b, do_step=True: self.step("packed", b, do_step), self.batches, self.steps,
                      self.device, self.emit, results.get("plain_ckpt"), backend=backend, path="project_paper_compiled",
                      eager_s=results.get("project_paper"), probe_ratio=probe_ratio, profile=a.profile,
                      run_probed=lambda b: self.step("packed", b, probe=True))


def compiled_step(backbone, run_step, batches, steps: int, device, emit, plain_ckpt: float | None, backend: str,
                  path: str = "project_compiled", eager_s: float | None = None, probe_ratio: float | None = None,
                  profile: bool = False, run_probed=None) -> None:
    """The project step with the language model's decoder layers compiled (compiled already: compiled
    again where a constant changed): the first step's time (compiling included) apart from the
    steady state, which is timed after a second, untimed step (a step of another token count makes
    dynamo compile once more, with dynamic sizes). For ``project_compiled``, its loss against the eager step's on the same batch and
    weights (the first step's loss is taken before its update). With ``probe_ratio`` (a probed
    step's time over a plain step's, eager), the epoch at the default probing (every 10th step) is
    estimated from it; with ``run_probed`` (a probed step, compiled too: the trainer's default where
    ``--compile auto`` compiles) it is measured, after one untimed probed step. With ``profile``, one
    more step is profiled (``profile_step_compiled``): where the compiled step's time goes."""
    from vlm2rec_lab.accel.compile import compile_layers

    try:
        eager = run_step(batches[0], do_step=False) if path == "project_compiled" else None
        compile_layers(backbone, backend=backend, retained_backward=run_probed is not None)  # (as the trainer does)
        sync(device); t = time.perf_counter()
        compiled = run_step(batches[0])
        sync(device)
        first = time.perf_counter() - t
        run_step(batches[1])  # a second shape: dynamo compiles once more, with dynamic sizes (not timed)
        settle(device); reset_peak(device); t = time.perf_counter()
        for b in batches[1:]:
            run_step(b)
        sync(device)
        s = (time.perf_counter() - t) / steps
        peak, probed = peak_gib(device), None  # (the step's own peak, as in the other rows)
        if run_probed is not None:
            run_probed(batches[0])  # (untimed: the probe's forwards apart may compile once more)
            settle(device); t = time.perf_counter()
            for b in batches[1:]:
                run_probed(b)
            sync(device)
            probed = (time.perf_counter() - t) / steps
    except Exception as e:  # noqa: BLE001  (a compiler failure is a figure too)
        emit(figure="train_step", path=path, error=f"{type(e).__name__}: {str(e)[:300]}")
        return
    row = dict(figure="train_step", path=path, backend=backend, seconds=round(s, 3), first_step_s=round(first, 1),
               beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1), peak_gib=peak,
               vs_plain_ckpt=round(plain_ckpt / s, 2) if plain_ckpt else None,
               vs_eager=round(eager_s / s, 2) if eager_s else None)
    if eager is not None:
        row.update(loss_eager=round(eager, 5), loss_compiled=round(compiled, 5), loss_rel_diff=round(abs(compiled - eager) / abs(eager), 6))
    if probe_ratio is not None:
        est = s * (9 + probe_ratio) / 10
        row.update(beauty_epoch_min_with_probe_est=round(est * BEAUTY_USERS / 8 / 60, 1))
    if probed is not None:
        row.update(probe_seconds=round(probed, 3), probe_step_vs_step=round(probed / s, 2), probe_peak_gib=peak_gib(device),
                   beauty_epoch_min_with_probe=round((9 * s + probed) / 10 * BEAUTY_USERS / 8 / 60, 1))
    emit(**row)
    if profile:
        profile_step(lambda: run_step(batches[1]), device, emit, figure="profile_step_compiled")


def packed_probe(peft, n_tokens: int, steps: int, device, dtype, emit) -> None:
    """The issue's headroom probe: the language model's forward + backward with LoRA over one step's
    tokens packed into one sequence (random input embeddings), no vision tower, no checkpointing."""
    lm = peft.get_base_model().model.language_model
    d = lm.config.hidden_size
    x = torch.randn(1, n_tokens, d, device=device, dtype=dtype)
    pos = torch.arange(n_tokens, device=device)[None].expand(3, 1, -1)
    for k in range(steps + 1):
        if k == 1:
            settle(device); reset_peak(device); t = time.perf_counter()
        h = lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state
        h[0, -32:].float().pow(2).mean().backward()
    sync(device)
    s = (time.perf_counter() - t) / steps
    emit(figure="packed_lm_probe", tokens=n_tokens, seconds=round(s, 3), beauty_epoch_min=round(s * BEAUTY_USERS / 8 / 60, 1),
         peak_gib=peak_gib(device))
