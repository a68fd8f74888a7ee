"""msa train: configuration, exact resume, the tiny preset end to end, phases and loss options."""

import json
import math

import pytest
import torch

from msa.cli import main
from msa.train import TrainConfig, apply_overrides, get_preset, resolve_config
from msa.train.config import from_dict
from msa.ops.block_max_kl import block_max_kl_loss
from msa.train.loss import forward_loss, kl_teacher_not_detached
from msa.train.trainer import Trainer, kl_support_at, lr_multiplier, mode_at, phase_mode_at

from .common import CACHE, one_thread, tiny_config


@pytest.fixture(autouse=True)
def _threads():
    with one_thread():
        yield


def test_config_rejects_unknown_and_mistyped_keys(tmp_path):
    with pytest.raises(ValueError, match="optim.lrr"):
        apply_overrides(TrainConfig(), ["optim.lrr=1"])
    with pytest.raises(ValueError, match="model.topk_blocks must be an int"):
        apply_overrides(TrainConfig(), ["model.topk_blocks=1.5"])
    with pytest.raises(ValueError, match="phase.kind"):
        apply_overrides(TrainConfig(), ["phase.kind=sparse"])
    with pytest.raises(ValueError, match="unknown config key.*data.seqlen"):
        from_dict(TrainConfig, {"data": {"seqlen": 3}})
    cfg = apply_overrides(TrainConfig(), ["optim.lr=3e-4", "model.topk_blocks=8", "eval.retrieval_lengths=[512]",
                                          "name=abc", "phase.kl_detach_teacher=false"])
    assert (cfg.optim.lr, cfg.model.topk_blocks, cfg.eval.retrieval_lengths, cfg.name) == (3e-4, 8, [512], "abc")
    assert cfg.phase.kl_detach_teacher is False
    (tmp_path / "c.toml").write_text('name = "t"\nsteps = 7\n[model]\ntopk_blocks = 4\n[optim]\nlr = 0.5\n')
    c2 = resolve_config("tiny", str(tmp_path / "c.toml"), ["optim.index_lr=0.25"])
    assert (c2.name, c2.steps, c2.model.topk_blocks, c2.optim.lr, c2.optim.index_lr) == ("t", 7, 4, 0.5, 0.25)
    assert c2.model.hidden_size == 32  # from the preset
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"hidden": 3}}))
    with pytest.raises(ValueError, match="model.hidden"):
        resolve_config("tiny", str(tmp_path / "bad.json"))


def test_config_rejects_bad_optimizer_and_model_values(capsys):
    """Values the optimizer or the model cannot use fail at configuration time, naming the key, before
    any data is read (a negative learning rate used to train, ascending the loss)."""
    for override, msg in (("optim.lr=-1", "optim.lr must be >= 0"), ("optim.index_lr=-0.1", "optim.index_lr"),
                          ("optim.weight_decay=-1", "optim.weight_decay"), ("optim.grad_clip=-1", "optim.grad_clip"),
                          ("optim.beta2=1.0", "optim.beta1 and optim.beta2"), ("optim.eps=0", "optim.eps"),
                          ("optim.warmup_steps=-1", "optim.warmup_steps"),
                          ("model.block_size=0", "model: block_size must be a positive int"),
                          ("model.num_dense_layers=9", "model: num_dense_layers"),
                          ("model.num_kv_heads=3", "model: .*num_kv_heads")):
        with pytest.raises(ValueError, match=msg):
            apply_overrides(get_preset("tiny"), [override])
    assert apply_overrides(get_preset("tiny"), ["optim.lr=0"]).optim.lr == 0  # a frozen backbone (index probe)
    assert main(["train", "--preset", "tiny", "--set", "model.block_size=0"]) == 2
    assert capsys.readouterr().err.startswith("msa train: model: block_size must be a positive int")


def test_list_presets_describes_every_preset(capsys):
    from msa.train import preset_names
    from msa.train.presets import DESCRIPTIONS
    assert set(DESCRIPTIONS) == set(preset_names())  # a new preset needs its line
    assert main(["train", "--list-presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == preset_names()
    assert any(ln.startswith("exp-msa-k32") and ln.endswith("exp-msa-blockkl with top-32 blocks") for ln in lines)


def test_schedule_and_phases():
    cfg = apply_overrides(TrainConfig(), ["steps=100", "optim.warmup_steps=10", "optim.min_lr_ratio=0.1",
                                          "phase.warmup_steps=30", "optim.index_schedule=constant"])
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(99, cfg, "index") == 1.0
    assert [mode_at(s, cfg) for s in (0, 29, 30, 99)] == ["dense", "dense", "sparse", "sparse"]
    local = apply_overrides(cfg, ["phase.kind=local"])
    dense = apply_overrides(cfg, ["phase.kind=dense"])
    assert mode_at(0, local) == "sparse" and mode_at(99, dense) == "dense"


def test_dense_every_schedule_config_and_step():
    cfg = apply_overrides(TrainConfig(), ["steps=100", "phase.warmup_steps=30", "phase.dense_every=4"])
    assert [mode_at(s, cfg) for s in (0, 29, 30, 31, 32, 33, 34, 37, 99)] == \
        ["dense", "dense", "sparse", "sparse", "sparse", "dense", "sparse", "dense", "sparse"]
    assert [phase_mode_at(s, cfg) for s in (29, 30, 33)] == ["dense", "sparse", "sparse"]
    assert mode_at(33, apply_overrides(cfg, ["phase.dense_every=0"])) == "sparse"
    with pytest.raises(ValueError, match="phase.dense_every must be >= 0"):
        apply_overrides(cfg, ["phase.dense_every=-1"])
    with pytest.raises(ValueError, match="phase.dense_every > 0 needs phase.kind='msa'"):
        apply_overrides(cfg, ["phase.kind=local"])
    # tiny: warmup 4, then every 2nd sparse step dense; a dense step trains as the warmup does (dense attention,
    # the full-support KL) and the model returns to the sparse mode after it
    tr = Trainer(tiny_config("phase.dense_every=2"), "/tmp/unused-densemix", progress=False, resume=False)
    recs = [tr.train_step() for _ in range(5)]
    assert [r["mode"] for r in recs] == ["dense"] * 4 + ["sparse"]
    state = tr.data.train.state_dict()
    b = tr.data.train.next()
    tr.data.train.load_state_dict(state)
    with torch.no_grad():
        tr.model.set_mode("dense")
        dense = forward_loss(tr.model, b.input_ids, b.cu_seqlens, kl_weight=1.0)
        tr.model.set_mode("sparse")
        sparse = forward_loss(tr.model, b.input_ids, b.cu_seqlens, kl_weight=1.0)
    gap = abs(float(dense["lm_loss"]) - float(sparse["lm_loss"]))
    assert gap > 0 and abs(float(dense["kl_loss"]) - float(sparse["kl_loss"])) > 1e-3
    rec = tr.train_step()  # step 5: the last of its pair of sparse-phase steps
    assert rec["mode"] == "dense"
    assert abs(rec["lm_loss"] - float(dense["lm_loss"])) < gap / 10
    assert rec["kl"] == pytest.approx(float(dense["kl_loss"]), rel=1e-5)
    assert tr.model.mode == "sparse"
    assert all(layer.attn.mode == "sparse" for layer in tr.model.layers if layer.attn.config.use_index)
    assert tr.train_step()["mode"] == "sparse"
    # the two levers for quality round 17's gap: dense steps, a doubled key budget (both with the block objective)
    mix, k32 = get_preset("exp-msa-densemix"), get_preset("exp-msa-k32")
    assert (mix.phase.dense_every, mix.phase.kl_target, mix.model.topk_blocks) == (4, "block_max", 16)
    assert (k32.phase.dense_every, k32.phase.kl_target, k32.model.topk_blocks) == (0, "block_max", 32)


def test_full_kl_every_schedule_config_and_step():
    cfg = apply_overrides(TrainConfig(), ["steps=100", "phase.warmup_steps=30", "phase.full_kl_every=4"])
    assert [kl_support_at(s, cfg) for s in (0, 29, 30, 31, 33, 34, 99)] == \
        ["selected", "selected", "full", "selected", "selected", "full", "selected"]
    assert kl_support_at(30, apply_overrides(cfg, ["phase.full_kl_every=0"])) == "selected"
    assert kl_support_at(30, apply_overrides(cfg, ["phase.kind=local"])) == "selected"
    with pytest.raises(ValueError, match="phase.full_kl_every must be >= 0"):
        apply_overrides(cfg, ["phase.full_kl_every=-1"])
    with pytest.raises(ValueError, match="full_kl_every > 0 needs phase.kl_detach_teacher"):
        apply_overrides(cfg, ["phase.kl_detach_teacher=false"])
    # a "full" step's KL is the model's KL over every causal token, with attention still sparse
    tr = Trainer(tiny_config("phase.full_kl_every=2"), "/tmp/unused-fullkl", progress=False, resume=False)
    recs = [tr.train_step() for _ in range(4)]
    assert [r["kl_support"] for r in recs] == ["selected"] * 4 and recs[-1]["mode"] == "dense"
    state = tr.data.train.state_dict()
    b = tr.data.train.next()
    tr.data.train.load_state_dict(state)
    tr.model.set_mode("sparse")
    with torch.no_grad():
        full = forward_loss(tr.model, b.input_ids, b.cu_seqlens, kl_weight=1.0, kl_support="full")
        sel = forward_loss(tr.model, b.input_ids, b.cu_seqlens, kl_weight=1.0)
    assert torch.equal(full["lm_loss"], sel["lm_loss"])              # the attention is the same
    assert abs(float(full["kl_loss"]) - float(sel["kl_loss"])) > 1e-4
    rec = tr.train_step()
    assert (rec["mode"], rec["kl_support"]) == ("sparse", "full")
    assert rec["kl"] == pytest.approx(float(full["kl_loss"]), rel=1e-5)
    assert tr.train_step()["kl_support"] == "selected"


def _losses(hist):
    return [(r["step"], r["lm_loss"], r["kl"]) for r in hist]


def test_interrupted_run_resumes_bitwise(tmp_path):
    cfg = tiny_config("steps=8", "checkpoint_every=3", "eval.every=4", "eval.final=false", "log_every=1",
                      "phase.warmup_steps=3")
    a = Trainer(cfg, str(tmp_path / "a"), progress=False)
    a.fit()
    b = Trainer(cfg, str(tmp_path / "b"), progress=False)
    s = b.fit(stop_at_step=5)   # an interruption after step 5 (the checkpoint is written then)
    assert s["status"] == "stopped" and s["step"] == 5
    del b
    c = Trainer(cfg, str(tmp_path / "b"), progress=False)   # a new process would do the same
    assert c.step == 5
    c.fit()
    assert len(a.history) == 8
    assert _losses(c.history) == _losses(a.history)       # bitwise equal floats
    assert [r.get("val_lm_loss") for r in c.history] == [r.get("val_lm_loss") for r in a.history]
    for (n, p), (_, q) in zip(a.model.state_dict().items(), c.model.state_dict().items()):
        assert torch.equal(p, q), n
    lines = (tmp_path / "b" / "log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, 9))
    # a different configuration refuses to resume in the same directory
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(apply_overrides(cfg, ["optim.lr=0.5"]), str(tmp_path / "b"), progress=False)


def test_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", f"data.cache_dir={CACHE}",
                 "--set", "steps=16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    hist = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert summary["status"] == "complete" and summary["step"] == 16
    assert [r["mode"] for r in hist if r["step"] <= 4] == ["dense"] * 4 and hist[-1]["mode"] == "sparse"
    assert hist[-1]["lm_loss"] < hist[0]["lm_loss"] - 0.3          # it learns
    assert 0 <= summary["block_recall"] <= 1 and 0 <= summary["score_recall"] <= 1
    assert set(summary["val_layer_kl"]) == {"1"}                  # layer 0 is dense (no index)
    fin = json.loads((out / "final_eval.json").read_text())
    assert fin["buckets"]["buckets"][0]["tokens"] > 0
    assert set(fin["retrieval"]["tasks"]) == {"needle", "multi_needle", "mqar", "var_track", "copy"}
    # the induction test at every evaluation and at the end: periods 64 (= min(256, 128 / 2)), one entry
    evals = [r for r in hist if "val_lm_loss" in r]
    assert evals and all(set(r["induction"]) == {"64"} for r in evals) and set(fin["induction"]) == {"64"}
    assert all(0 <= r["induction"]["64"]["second_acc"] <= 1 for r in evals)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "complete at step 16/16" in capsys.readouterr().out
    # running the finished run again resumes at the end and changes nothing
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", f"data.cache_dir={CACHE}",
                 "--set", "steps=16"]) == 0
    assert json.loads((out / "summary.json").read_text())["val_lm_loss"] == summary["val_lm_loss"]
    # another configuration in the same --out: a one-line refusal naming the difference, exit code 2
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--out", str(out), "--no-progress", "--set", f"data.cache_dir={CACHE}",
                 "--set", "steps=16", "--set", "optim.lr=0.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msa train: ") and "different configuration" in err and "optim" in err


def test_local_window_selects_only_the_last_blocks():
    cfg = tiny_config("phase.kind=local", "phase.kl_weight=0")
    tr = Trainer(cfg, "/tmp/unused-local", progress=False, resume=False)
    tr.model.set_mode("sparse")
    b = tr.data.train.next()
    out = tr.model(b.input_ids, cu_seqlens=b.cu_seqlens, compute_kl=False)
    sel = out.block_indices[1][0, :, 0]        # (T, topk) of the MSA layer, group 0
    k, bs = cfg.model.topk_blocks, cfg.model.block_size
    cu = b.cu_seqlens.tolist()
    for s, e in zip(cu[:-1], cu[1:]):
        for i in range(s, e):
            own = (i - s) // bs
            want = set(range(max(0, own - k + 1), own + 1))
            got = set(x for x in sel[i].tolist() if x >= 0)
            assert got == want, (i, got, want)


def test_kl_with_teacher_gradient_matches_the_op_and_reaches_the_backbone():
    import msa
    torch.manual_seed(0)
    t, hq, hkv, d, di, bs = 70, 4, 2, 8, 8, 16
    q = torch.randn(1, t, hq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, t, hkv, d, dtype=torch.float64, requires_grad=True)
    qi = torch.randn(1, t, hkv, di, dtype=torch.float64, requires_grad=True)
    ki = torch.randn(1, t, di, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 30, 70], dtype=torch.int32)
    idx = msa.select_blocks(qi, ki, block_size=bs, topk=2, cu_seqlens=cu)
    for bi in (None, idx):
        ref = msa.indexer_kl_loss(qi, ki, q, k, bi, block_size=bs, cu_seqlens=cu, backend="reference")
        ours = kl_teacher_not_detached(qi, ki, q, k, bi, block_size=bs, scale=d ** -0.5, index_scale=di ** -0.5,
                                       cu_seqlens=cu)
        assert float(ours.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
        g_ref = torch.autograd.grad(ref, [qi, ki])
        gq, gk, gqi, gki = torch.autograd.grad(ours, [q, k, qi, ki])
        assert torch.allclose(gqi, g_ref[0].to(gqi.dtype), atol=1e-6) and torch.allclose(gki, g_ref[1].to(gki.dtype), atol=1e-6)
        assert gq.abs().max() > 1e-4 and gk.abs().max() > 1e-4     # the teacher moves now


@pytest.mark.parametrize("detach", [True, False])
def test_kl_reaches_backbone_only_without_detach(detach):
    cfg = tiny_config(f"phase.kl_detach_teacher={str(detach).lower()}")
    tr = Trainer(cfg, "/tmp/unused-kl", progress=False, resume=False)
    b = tr.data.train.next()
    m = tr.model
    grads = {}
    for w in (0.0, 1.0):
        m.zero_grad(set_to_none=True)
        out = forward_loss(m, b.input_ids, b.cu_seqlens, kl_weight=w, detach_teacher=detach)
        out["loss"].backward()
        ig = m.layers[1].attn.k_idx_proj.weight.grad
        grads[w] = (m.layers[1].attn.q_proj.weight.grad.clone(), None if ig is None else ig.clone())
        if w:
            assert float(out["kl_loss"]) == pytest.approx(float(sum(out["layer_kl"].values())), rel=1e-6)
            assert float(out["loss"].detach()) == pytest.approx(float(out["lm_loss"] + out["kl_loss"]), rel=1e-6)
    assert grads[0.0][1] is None                      # the LM loss never reaches the index
    assert grads[1.0][1].abs().max() > 0              # the KL trains the index
    kl_part = grads[1.0][0] - grads[0.0][0]          # the KL's share of the backbone gradient
    if detach:
        assert torch.equal(grads[1.0][0], grads[0.0][0])
    else:
        assert kl_part.abs().max() > 1e-3 * grads[0.0][0].abs().max()


def test_cpt_starts_from_a_dense_checkpoint(tmp_path):
    dense = tiny_config("phase.kind=dense", "phase.kl_weight=0", "steps=3", "eval.final=false", "eval.every=0")
    Trainer(dense, str(tmp_path / "dense"), progress=False).fit()
    cpt = tiny_config(f"phase.init_from={tmp_path / 'dense'}", "phase.reinit_index=true", "steps=2")
    t = Trainer(cpt, str(tmp_path / "cpt"), progress=False)
    d_state = torch.load(sorted((tmp_path / "dense" / "checkpoints").glob("*.pt"))[-1], weights_only=False)["model"]
    for n, p in t.model.state_dict().items():
        if "_idx_norm" in n:
            assert torch.equal(p, torch.zeros_like(p)), n  # identity index norms ((1 + w) scaling)
        elif "_idx_" in n:
            assert not torch.equal(p, d_state[n]), n      # fresh index projections
        else:
            assert torch.equal(p, d_state[n]), n
    with pytest.raises(ValueError, match="init_from"):
        Trainer(tiny_config(f"phase.init_from={tmp_path / 'nothing'}"), str(tmp_path / "x"), progress=False)


def test_zero_backbone_lr_trains_only_the_index(tmp_path):
    """exp-msa-indexprobe's mechanism: optim.lr=0 leaves every backbone weight bit-identical to the
    checkpoint it started from while the index projections still learn."""
    base = tiny_config("steps=3", "eval.final=false", "eval.every=0")
    Trainer(base, str(tmp_path / "base"), progress=False).fit()
    probe = tiny_config(f"phase.init_from={tmp_path / 'base'}", "optim.lr=0", "optim.index_schedule=constant",
                        "phase.warmup_steps=3", "steps=3", "eval.final=false", "eval.every=0")
    t = Trainer(probe, str(tmp_path / "probe"), progress=False)
    before = {n: p.detach().clone() for n, p in t.model.state_dict().items()}
    t.fit()
    after = t.model.state_dict()
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("_idx_" in n for n in moved), sorted(moved)[:6]
    assert {n for n in moved if "_idx_proj" in n}  # the projections themselves learn


def test_index_weight_decay_holds_the_index_projections_down(tmp_path):
    """optim.index_weight_decay (exp-msa-indexwd) reaches the index projections: Adam grows these
    scale-invariant weights, decay holds them near their initial size."""
    rms = {}
    for wd in (0.0, 20.0):
        t = Trainer(tiny_config("steps=12", "phase.warmup_steps=0", "eval.every=0", "eval.final=false",
                                "checkpoint_every=0", f"optim.index_weight_decay={wd}"), str(tmp_path / str(wd)),
                    progress=False)
        t.fit()
        sd = t.model.state_dict()
        rms[wd] = float(torch.cat([v.flatten() for n, v in sd.items() if "_idx_proj" in n]).float().pow(2).mean().sqrt())
    assert rms[20.0] < 0.8 * rms[0.0], rms
    assert get_preset("exp-msa-indexwd").optim.index_weight_decay > 0


def test_a_fresh_index_of_another_width_starts_from_a_trained_backbone(tmp_path):
    """A capacity probe: phase.reinit_index lets model.index_dim differ from the checkpoint's (the
    backbone is loaded exactly); without it the mismatch is refused with a clear error."""
    base = tiny_config("steps=2", "eval.final=false", "eval.every=0")
    Trainer(base, str(tmp_path / "base"), progress=False).fit()
    b_state = torch.load(sorted((tmp_path / "base" / "checkpoints").glob("*.pt"))[-1], weights_only=False)["model"]
    wide = tiny_config(f"phase.init_from={tmp_path / 'base'}", "phase.reinit_index=true", "model.index_dim=32",
                       "optim.lr=0", "steps=1")
    t = Trainer(wide, str(tmp_path / "wide"), progress=False)
    state = t.model.state_dict()
    proj = [n for n in state if n.endswith("q_idx_proj.weight")]
    assert proj and all(state[n].shape[0] == 32 * base.model.num_kv_heads != b_state[n].shape[0] for n in proj)
    assert all(torch.equal(v, b_state[n]) for n, v in state.items() if "_idx_" not in n)
    with pytest.raises(ValueError, match="only the index branch may change shape.*reinit_index"):
        Trainer(tiny_config(f"phase.init_from={tmp_path / 'base'}", "model.index_dim=32"), str(tmp_path / "x"),
                progress=False)
    with pytest.raises(ValueError, match="shapes differ"):
        Trainer(tiny_config(f"phase.init_from={tmp_path / 'base'}", "phase.reinit_index=true",
                            "model.intermediate_size=96"), str(tmp_path / "y"), progress=False)


def test_eval_mode_judges_a_warmup_trained_index_by_its_own_selections(tmp_path):
    """eval.mode=sparse evaluates a run that trains in warmup (dense) mode as the sparse model would
    run, exactly as if the mode had been set by hand, and gives training its mode back."""
    t = Trainer(tiny_config("steps=2", "phase.warmup_steps=2", "eval.every=0", "eval.final=false"),
                str(tmp_path / "r"), progress=False)
    t.fit()
    assert t.model.mode == "dense"
    dense = t.evaluate()
    t.cfg.eval.mode = "sparse"
    sparse = t.evaluate()
    final = t.final_evaluation()
    assert t.model.mode == "dense"  # restored for the next training step / checkpoint
    t.cfg.eval.mode = "train"
    t.model.set_mode("sparse")
    by_hand = t.evaluate()
    assert sparse["val_lm_loss"] == by_hand["val_lm_loss"] and sparse["block_recall"] == by_hand["block_recall"]
    assert abs(sparse["val_lm_loss"] - dense["val_lm_loss"]) > 1e-4  # top-3 of 8 blocks is not dense attention
    assert final["mode"] == "sparse"
    with pytest.raises(ValueError, match="eval.mode must be one of"):
        tiny_config("eval.mode=local")
    with pytest.raises(ValueError, match="eval.mode='sparse' needs phase.kind='msa'"):
        tiny_config("phase.kind=dense", "phase.kl_weight=0", "eval.mode=sparse")
    assert get_preset("exp-msa-indexprobe").eval.mode == "sparse"


def test_sampled_teacher_gradient_equals_exact_with_all_rows_and_keeps_the_value():
    cfg = tiny_config("phase.kl_detach_teacher=false")
    tr = Trainer(cfg, "/tmp/unused-kl2", progress=False, resume=False)
    b = tr.data.train.next()
    m = tr.model
    res = {}
    for rows in (0, 10 ** 6, 50):
        m.zero_grad(set_to_none=True)
        out = forward_loss(m, b.input_ids, b.cu_seqlens, kl_weight=1.0, detach_teacher=False, teacher_grad_rows=rows)
        out["loss"].backward()
        res[rows] = (float(out["kl_loss"]), m.layers[1].attn.q_proj.weight.grad.clone(),
                     m.layers[1].attn.k_idx_proj.weight.grad.clone())
    assert res[10 ** 6][0] == pytest.approx(res[0][0], rel=1e-5)
    assert res[50][0] == pytest.approx(res[0][0], rel=1e-5)        # the estimate adds 0 to the value
    for j in (1, 2):
        assert torch.allclose(res[10 ** 6][j], res[0][j], rtol=1e-4, atol=1e-7)
    assert torch.equal(res[50][2], res[10 ** 6][2])                 # index gradients do not depend on rows
    assert not torch.allclose(res[50][1], res[0][1], rtol=1e-6, atol=0)


def test_index_init_std_changes_only_the_index():
    base = Trainer(tiny_config(), "/tmp/unused-init", progress=False, resume=False).model.state_dict()
    big = Trainer(tiny_config("model.index_init_std=0.5"), "/tmp/unused-init", progress=False,
                  resume=False).model.state_dict()
    for n, p in base.items():
        if "_idx_proj" in n:
            assert big[n].std() > 10 * p.std(), n
        else:
            assert torch.equal(p, big[n]), n


@pytest.mark.filterwarnings("ignore:Seems like:UserWarning")
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    # two micro-batches of one window vs one batch of the same two windows: the same gradient (the
    # token mean is per micro-batch; equal here, both windows hold the same number of targets)
    one = Trainer(tiny_config("data.batch_size=2", "grad_accum=1", "optim.grad_clip=0"), str(tmp_path / "a"),
                  progress=False, resume=False)
    two = Trainer(tiny_config("data.batch_size=1", "grad_accum=2", "optim.grad_clip=0"), str(tmp_path / "b"),
                  progress=False, resume=False)
    w_one = one.data.train._permutation()[:2].tolist()
    assert two.data.train._permutation()[:2].tolist() == w_one      # the same windows in the same order
    assert all(one.data.train.windows.single[w] for w in w_one)
    for t in (one, two):
        t.opt.step = lambda: None                                   # keep the gradients, skip the update
        t.train_step()
    assert two.tokens_seen == one.tokens_seen
    n_checked = 0
    for (n, p), (_, q) in zip(one.model.named_parameters(), two.model.named_parameters()):
        if p.grad is None:
            assert q.grad is None, n
            continue
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), n
        n_checked += 1
    assert n_checked > 10


def test_wall_clock_cap_stops_with_a_checkpoint_and_the_run_resumes(tmp_path):
    cfg = tiny_config("steps=6", "eval.every=0", "eval.final=false", "checkpoint_every=0")
    a = Trainer(cfg, str(tmp_path / "a"), progress=False)
    a.fit()
    capped = apply_overrides(cfg, ["max_minutes=1e-9"])
    s = Trainer(capped, str(tmp_path / "b"), progress=False).fit()
    assert s["status"] == "interrupted" and s["step"] == 1
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["status"] == "interrupted"
    c = Trainer(cfg, str(tmp_path / "b"), progress=False)   # max_minutes may change between the commands
    assert c.fit()["status"] == "complete"
    assert _losses(c.history) == _losses(a.history)


def _block_max_kl_row(qi, ki, q, k, bs):
    """block_max_kl_loss's docstring formula for one query (the last of its prefix): qi (H_kv, D_idx),
    ki (i+1, D_idx), q (H_q, D), k (i+1, H_kv, D); summed over the groups (float64)."""
    hkv, g, d, di, i = qi.shape[0], q.shape[0] // qi.shape[0], q.shape[1], qi.shape[1], ki.shape[0] - 1
    total = 0.0
    for r in range(hkv):
        s = (qi[r] @ ki.T) * di ** -0.5
        m = torch.stack([s[b * bs:(b + 1) * bs].max() for b in range(i // bs + 1)])
        p = torch.softmax(q[r * g:(r + 1) * g] @ k[:, r].T * d ** -0.5, -1).mean(0)
        big_p = torch.stack([p[b * bs:(b + 1) * bs].sum() for b in range(i // bs + 1)])
        total = total + (big_p * (big_p.log() - torch.log_softmax(m, 0))).sum()
    return total


def _block_max_kl_naive(qi, ki, q, k, spans, bs):
    """block_max_kl_loss's docstring formula, one query at a time, averaged over tokens and groups."""
    total = 0.0
    for s0, e0 in spans:
        for i in range(s0, e0):
            total = total + _block_max_kl_row(qi[0, i], ki[0, s0:i + 1], q[0, i], k[0, s0:i + 1], bs)
    return total / (qi.shape[1] * qi.shape[2])


@pytest.mark.parametrize("g", [1, 2])
def test_block_max_kl_matches_its_formula_and_trains_only_the_index(g):
    """phase.kl_target="block_max": value and index gradients against the per-query formula (packed
    sequences, a short last block; fp64 inputs, fp32 inside: rtol 1e-6, grads atol 1e-7); the teacher
    gets no gradient."""
    torch.manual_seed(0)
    t, hkv, d, di, bs = 37, 2, 8, 6, 5
    q = torch.randn(1, t, hkv * g, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, t, hkv, d, dtype=torch.float64, requires_grad=True)
    qi = torch.randn(1, t, hkv, di, dtype=torch.float64, requires_grad=True)
    ki = torch.randn(1, t, di, dtype=torch.float64, requires_grad=True)
    cu = torch.tensor([0, 20, t], dtype=torch.int32)
    ours = block_max_kl_loss(qi, ki, q, k, block_size=bs, scale=d ** -0.5, index_scale=di ** -0.5, cu_seqlens=cu)
    ref = _block_max_kl_naive(qi, ki, q.detach(), k.detach(), [(0, 20), (20, t)], bs)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6) and ours.item() > 0
    g_ours = torch.autograd.grad(ours, (qi, ki, q, k), retain_graph=True, allow_unused=True)
    assert g_ours[2] is None and g_ours[3] is None  # the teacher is detached
    g_ours = g_ours[:2]
    g_ref = torch.autograd.grad(ref, (qi, ki))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_block_max_kl_on_sampled_rows_is_the_weighted_formula():
    """rows_per_sequence R: the formula over the R positions drawn (torch's global RNG), each weighted
    n / R; R >= n is the full loss; the mean over draws approaches the full loss (unbiased)."""
    torch.manual_seed(1)
    t, hkv, g, d, di, bs = 29, 2, 2, 8, 6, 4
    q, k = torch.randn(1, t, hkv * g, d, dtype=torch.float64), torch.randn(1, t, hkv, d, dtype=torch.float64)
    qi = torch.randn(1, t, hkv, di, dtype=torch.float64, requires_grad=True)
    ki = torch.randn(1, t, di, dtype=torch.float64, requires_grad=True)
    kw = dict(block_size=bs, scale=d ** -0.5, index_scale=di ** -0.5)
    full = block_max_kl_loss(qi, ki, q, k, **kw).item()
    assert block_max_kl_loss(qi, ki, q, k, rows_per_sequence=t, **kw).item() == full
    torch.manual_seed(7)
    rows = torch.randperm(t)[:5].sort().values
    torch.manual_seed(7)
    est = block_max_kl_loss(qi, ki, q, k, rows_per_sequence=5, **kw)
    ref = sum(_block_max_kl_row(qi[0, i], ki[0, :i + 1], q[0, i], k[0, :i + 1], bs) for i in rows.tolist())
    ref = ref * (t / 5) / (t * hkv)
    assert est.item() == pytest.approx(ref.item(), rel=1e-6)
    g_est, g_ref = torch.autograd.grad(est, (qi, ki)), torch.autograd.grad(ref, (qi, ki))
    for a, b in zip(g_est, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    draws = [block_max_kl_loss(qi, ki, q, k, rows_per_sequence=5, **kw).item() for _ in range(400)]
    assert sum(draws) / len(draws) == pytest.approx(full, rel=0.05)
    with pytest.raises(ValueError, match="rows_per_sequence must be >= 0"):
        block_max_kl_loss(qi, ki, q, k, rows_per_sequence=-1, **kw)


def test_block_max_target_config_and_training_step(tmp_path):
    """phase.kl_target and phase.kl_rows are validated; "block_max" (here on 48 sampled rows of 128)
    trains the index through the trainer and leaves the frozen backbone exactly as it was."""
    with pytest.raises(ValueError, match="phase.kl_target must be one of"):
        apply_overrides(TrainConfig(), ["phase.kl_target=blocks"])
    with pytest.raises(ValueError, match="kl_target='block_max' needs phase.kl_detach_teacher=true"):
        apply_overrides(TrainConfig(), ["phase.kl_target=block_max", "phase.kl_detach_teacher=false"])
    with pytest.raises(ValueError, match="block_max' re-projects.*use parallel.strategy=ddp"):
        apply_overrides(TrainConfig(), ["phase.kl_target=block_max", "parallel.strategy=fsdp2"])
    with pytest.raises(ValueError, match="phase.kl_rows > 0 needs phase.kl_target='block_max'"):
        apply_overrides(TrainConfig(), ["phase.kl_rows=64"])
    with pytest.raises(ValueError, match="phase.kl_rows must be >= 0"):
        apply_overrides(TrainConfig(), ["phase.kl_target=block_max", "phase.kl_rows=-1"])
    with pytest.raises(ValueError, match="kl_target must be one of"):
        forward_loss(torch.nn.Identity(), torch.zeros(1, 4, dtype=torch.long), None, kl_weight=1.0, kl_target="max")
    cfg = tiny_config("phase.kl_target=block_max", "phase.kl_rows=48", "optim.lr=0", "steps=3", "phase.warmup_steps=1",
                      "eval.every=0", "eval.final=false", "checkpoint_every=0")
    t = Trainer(cfg, str(tmp_path / "bm"), progress=False)
    before = {n: p.detach().clone() for n, p in t.model.state_dict().items()}
    state = t.data.train.state_dict()
    b = t.data.train.next()
    t.data.train.load_state_dict(state)
    t.model.set_mode("dense")
    out = forward_loss(t.model, b.input_ids, b.cu_seqlens, kl_weight=1.0, kl_target="block_max")
    token = forward_loss(t.model, b.input_ids, b.cu_seqlens, kl_weight=1.0)
    assert set(out["layer_kl"]) == set(token["layer_kl"]) and float(out["kl_loss"]) != float(token["kl_loss"])
    recs = [t.train_step() for _ in range(3)]
    assert all(r["kl"] > 0 for r in recs) and [r["mode"] for r in recs] == ["dense", "sparse", "sparse"]
    moved = {n for n, v in t.model.state_dict().items() if not torch.equal(before[n], v)}
    assert moved and all("_idx_" in n for n in moved), sorted(moved)[:6]
    bk = get_preset("exp-msa-blockkl")
    assert (bk.phase.kl_target, bk.phase.kl_rows) == ("block_max", 2048)


def test_block_max_step_on_triton_matches_reference(tmp_path, monkeypatch):
    """The trainer's block_max KL follows model.backend: two fp32 steps on the Triton op give the reference's
    losses and index weights after two Adam steps on the same rows (interpreter: rel 1e-5 / atol 1e-6;
    GPU, where the whole model's kernels and summation orders differ: rel 1e-4 / atol 1e-5)."""
    rel, atol = (1e-5, 1e-6) if not torch.cuda.is_available() else (1e-4, 1e-5)
    from msa.ops.block_max_kl import triton_impl
    calls, original = [], triton_impl.BlockMaxKLTriton

    class Counted(original):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return original.forward(ctx, *args)

    monkeypatch.setattr(triton_impl, "BlockMaxKLTriton", Counted)
    runs = {}
    for backend in ("reference", "triton"):
        cfg = tiny_config("phase.kl_target=block_max", "phase.kl_rows=40", "steps=2", "phase.warmup_steps=1",
                          "eval.every=0", "eval.final=false", "checkpoint_every=0", "precision=fp32",
                          f"model.backend={backend}", f"device={'cuda' if torch.cuda.is_available() else 'cpu'}")
        t = Trainer(cfg, str(tmp_path / backend), progress=False)
        recs = [t.train_step() for _ in range(2)]
        runs[backend] = (recs, {n: v.detach().clone() for n, v in t.model.state_dict().items() if "_idx_" in n})
        assert bool(calls) == (backend == "triton")
    (ref, ref_w), (tri, tri_w) = runs["reference"], runs["triton"]
    for a, b in zip(ref, tri):
        assert b["kl"] == pytest.approx(a["kl"], rel=rel) and a["kl"] > 0
    for n in ref_w:
        torch.testing.assert_close(tri_w[n], ref_w[n], rtol=0, atol=atol)


def test_eval_windows_follow_eval_seed_not_run_seed():
    """Runs that differ only in ``seed`` are judged on the same validation / test windows; eval.seed picks them."""
    from msa.train.trainer import build_data
    ids = {}
    for name, extra in (("a", []), ("b", ["seed=3"]), ("c", ["eval.seed=3"])):
        d = build_data(tiny_config("eval.batches=6", "eval.bucket_windows=6", *extra), torch.device("cpu"), log=lambda *_: None)
        ids[name] = (d.val_ids, d.test_ids)
    assert ids["a"] == ids["b"]
    assert ids["a"] != ids["c"]
    with pytest.raises(ValueError, match="eval.seed and data.seed must be >= 0"):
        tiny_config("eval.seed=-1")
