"""MSAForCausalLM: the mode is part of the config, save/load round trips, configs under torch.load's
weights_only, and clear errors for bad input (model, cache, generate, loss)."""

import io
import json
import math

import pytest
import torch
import torch.nn.functional as F

import msa
from msa import MSACache, MSAConfig, MSAForCausalLM, MSALMConfig


def make_config(**kw):
    att = dict(hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, index_dim=8, block_size=8, topk_blocks=2,
               backend="reference", mode="dense")
    att.update(kw.pop("attention", {}))
    base = dict(vocab_size=50, num_layers=2, intermediate_size=48, num_dense_layers=1, attention=MSAConfig(**att))
    base.update(kw)
    return MSALMConfig(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return MSAForCausalLM(make_config(**kw)).eval()


def ids(b=2, t=48, vocab=50, seed=1):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def test_exported_from_msa_with_docstrings():
    for obj in (msa.MSAForCausalLM, msa.MSALMConfig, msa.LMOutput, MSAForCausalLM.save_pretrained,
                MSAForCausalLM.from_pretrained, MSAForCausalLM.set_mode, MSAForCausalLM.forward):
        assert obj.__doc__ and len(obj.__doc__) > 40, obj
    assert {"MSAForCausalLM", "MSALMConfig", "LMOutput"} <= set(msa.__all__)


def test_set_mode_is_recorded_in_the_config_so_a_rebuilt_model_stays_sparse():
    model = make_model()
    x = ids()
    dense = model(x).logits
    model.set_mode("sparse")
    sparse = model(x).logits
    # 48 tokens = 6 blocks of 8 > topk 2: the sparse model really differs from the dense one
    assert (sparse - dense).abs().max() > 1e-4
    assert model.config.attention.mode == "sparse" and model.config.mode == "sparse" and model.mode == "sparse"
    rebuilt = MSAForCausalLM(model.config).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert [lyr.attn.mode for lyr in rebuilt.layers] == ["dense", "sparse"]  # layer 0 is a dense layer
    torch.testing.assert_close(rebuilt(x).logits, sparse, rtol=0, atol=0)
    rebuilt.set_mode("dense")  # each model owns its config
    assert model.mode == "sparse" and rebuilt.config.mode == "dense"


@pytest.mark.parametrize("safe", [True, False])
def test_save_pretrained_round_trip(tmp_path, safe):
    model = make_model(attention=dict(init_blocks=1, local_blocks=1, topk_blocks=3, rope_theta=500.0))
    model.set_mode("sparse")
    x = ids()
    want = model(x).logits
    model.save_pretrained(tmp_path, safe_serialization=safe)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(["config.json", "model.safetensors" if safe else "pytorch_model.bin"])
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "msa_lm" and saved["attention"]["mode"] == "sparse"
    assert saved["attention"]["block_size"] == 8 and saved["attention"]["init_blocks"] == 1
    loaded = MSAForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    assert loaded.mode == "sparse"
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and torch.equal(a, b), n
    assert loaded.lm_head.weight is loaded.embed.weight  # still tied
    torch.testing.assert_close(loaded(x).logits, want, rtol=0, atol=0)


def test_save_switching_format_removes_the_stale_weights_file(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path, safe_serialization=False)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert not (tmp_path / "pytorch_model.bin").exists()
    assert torch.equal(MSAForCausalLM.from_pretrained(tmp_path).embed.weight, model.embed.weight)


def test_round_trip_untied_bf16_and_layer_level_mode(tmp_path):
    model = make_model(tie_embeddings=False, num_dense_layers=0).to(torch.bfloat16)
    for lyr in model.layers:  # modes set per layer are folded into the saved config
        lyr.attn.set_mode("sparse")
    model.save_pretrained(tmp_path)
    loaded = MSAForCausalLM.from_pretrained(tmp_path)
    assert loaded.embed.weight.dtype == torch.bfloat16 and loaded.mode == "sparse"
    assert loaded.lm_head.weight is not loaded.embed.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert MSAForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).embed.weight.dtype == torch.float32


def test_mixed_layer_modes_cannot_be_saved(tmp_path):
    model = make_model(num_dense_layers=0)
    model.layers[1].attn.set_mode("sparse")
    with pytest.raises(ValueError, match="different modes"):
        model.save_pretrained(tmp_path)


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="load_directory"):
        MSAForCausalLM.from_pretrained(tmp_path / "missing")
    make_model().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_layers": 3}))
    with pytest.raises(ValueError, match="do not match the config"):
        MSAForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "hidden": 3}))
    with pytest.raises(ValueError, match="unknown MSALMConfig keys: \\['hidden'\\]"):
        MSAForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        MSAForCausalLM.from_pretrained(tmp_path)


def test_config_pickles_load_under_default_weights_only():
    cfg = make_config()
    cfg.attention.mode = "sparse"
    model = MSAForCausalLM(cfg)
    buf = io.BytesIO()
    torch.save({"config": cfg, "state_dict": model.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # torch's default: weights_only=True
    assert ckpt["config"] == cfg and ckpt["config"].attention.mode == "sparse"
    again = MSAForCausalLM(ckpt["config"])
    again.load_state_dict(ckpt["state_dict"])
    assert again.mode == "sparse"


def test_config_dict_round_trip_and_validation():
    cfg = make_config()
    assert MSALMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for field, bad in (("vocab_size", 0), ("vocab_size", 2.5), ("num_layers", 0), ("intermediate_size", -1),
                       ("kl_weight", -1.0), ("kl_weight", float("nan")), ("tie_embeddings", 1),
                       ("num_dense_layers", 3)):
        with pytest.raises(ValueError, match=field):
            make_config(**{field: bad})
    with pytest.raises(ValueError, match="attention must be an MSAConfig"):
        MSALMConfig(attention="dense")
    with pytest.raises(ValueError, match="unknown MSAConfig keys"):
        MSALMConfig.from_dict({**cfg.to_dict(), "attention": {**cfg.attention.__dict__, "topk": 3}})
    with pytest.raises(ValueError, match="config must be an MSALMConfig"):
        MSAForCausalLM(cfg.to_dict())


@pytest.mark.parametrize("bad,match", [
    (lambda x: x + 50, r"input_ids must hold token ids in \[0, vocab_size=50\), got values in \[50,"),
    (lambda x: x - 1 - x.max(), r"input_ids must hold token ids in \[0, vocab_size=50\)"),
    (lambda x: x.float(), "input_ids must be an integer tensor"),
    (lambda x: x.tolist(), "input_ids must be a torch.Tensor"),
    (lambda x: x[0], r"input_ids must have shape \(B, T\)"),
    (lambda x: x[:, :0], "at least one token"),
])
def test_forward_rejects_bad_token_ids(bad, match):
    model = make_model()
    with pytest.raises(ValueError, match=match):
        model(bad(ids()))
    with pytest.raises(ValueError, match="input_ids"):
        model.loss(bad(ids()))


def test_layer_idx_beyond_the_cache():
    model = make_model()
    small = MSACache(1, 2, 64, 2, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="cache holds 1 layers but the model has 2"):
        model(ids(), cache=small)
    with pytest.raises(ValueError, match=r"layer_idx must be in \[0, 1\)"):
        model.layers[1].attn(torch.randn(2, 4, 32), cache=small, layer_idx=1)
    with pytest.raises(ValueError, match=r"layer_idx must be in \[0, 1\)"):
        small.seq_lens(1)
    with pytest.raises(ValueError, match="layer_idx"):
        small.seq_lens(-1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(prompts=[[1, 2, 3]]), r"prompts\[0\] must be a 1-D torch.Tensor"),
    (dict(prompts="hello"), "prompts must be a \\(B, T\\) torch.Tensor"),
    (dict(prompts=[torch.tensor([1.0, 2.0])]), r"prompts\[0\] must be an integer tensor"),
    (dict(prompts=[torch.tensor([1, 2]), torch.tensor([3, 99])]), r"prompts\[1\] must hold token ids in \[0, vocab_size=50\)"),
    (dict(prompts=[]), "at least one prompt"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=1.0, top_k=51), r"top_k must be None or an int in \[1, vocab_size=50\], got 51"),
    (dict(temperature=1.0, top_k=0), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
])
def test_generate_rejects_bad_arguments(kwargs, match):
    model = make_model()
    args = dict(prompts=[torch.tensor([1, 2, 3])], max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        model.generate(args.pop("prompts"), args.pop("max_new_tokens"), **args)


def test_generate_accepts_top_k_equal_to_the_vocabulary():
    model = make_model()
    g = torch.Generator().manual_seed(0)
    out = model.generate([torch.tensor([1, 2, 3])], 3, temperature=1.0, top_k=50, generator=g)
    assert out[0].shape == (3,) and int(out[0].min()) >= 0 and int(out[0].max()) < 50


def test_loss_without_any_target_raises_instead_of_nan():
    model = make_model()
    with pytest.raises(ValueError, match="at least one next-token target"):
        model.loss(ids(t=1))
    cu = torch.tensor([0, 1, 2, 3], dtype=torch.int32)  # three packed one-token sequences
    with pytest.raises(ValueError, match="at least one next-token target"):
        model.loss(ids(b=1, t=3), cu_seqlens=cu)


def test_loss_with_one_token_sequences_among_longer_ones_is_the_mean_over_real_targets():
    model = make_model()
    x = ids(b=1, t=12)
    cu = torch.tensor([0, 1, 9, 10, 12], dtype=torch.int32)  # lengths 1, 8, 1, 2
    got = model.loss(x, cu_seqlens=cu)["lm_loss"]
    logits = model(x, cu_seqlens=cu).logits[0]
    # targets: positions 1..7 predict 2..8 (sequence of 8) and position 10 predicts 11
    src = torch.tensor([1, 2, 3, 4, 5, 6, 7, 10])
    want = F.cross_entropy(logits[src], x[0, src + 1])
    assert math.isfinite(float(got.detach()))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
