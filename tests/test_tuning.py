"""msa.tuning: the one configuration surface of the kernels (fields, overrides, MSA_TUNING parsing)."""

import threading

import pytest

import msa.tuning as tuning
from msa.ops.sparse_attention.triton_impl import choose_kernel, kv_outer_config


def test_override_nests_and_restores():
    base = tuning.current()
    with tuning.override(sparse_fwd_kernel="qo") as a:
        assert tuning.current() is a and a.sparse_fwd_kernel == "qo"
        with tuning.override(sparse_bwd_dq="query"):
            assert tuning.current().sparse_fwd_kernel == "qo" and tuning.current().sparse_bwd_dq == "query"
        assert tuning.current().sparse_bwd_dq == base.sparse_bwd_dq
    assert tuning.current() == base


def test_override_is_thread_local():
    seen = {}
    with tuning.override(sparse_fwd_kernel="qo"):
        t = threading.Thread(target=lambda: seen.setdefault("k", tuning.current().sparse_fwd_kernel))
        t.start()
        t.join()
    assert seen["k"] == "auto"


@pytest.mark.parametrize("kw,match", [
    (dict(sparse_fwd_kernal="qo"), r"unknown tuning field\(s\) \['sparse_fwd_kernal'\]"),
    (dict(sparse_fwd_kernel="fast"), "sparse_fwd_kernel must be one of"),
    (dict(kl_partial_bytes=-1), "kl_partial_bytes must be None or a positive int"),
    (dict(decode_pdl="yes"), "decode_pdl must be a bool"),
    (dict(tile_order="sorted"), "tile_order must be one of"),
])
def test_bad_overrides_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        with tuning.override(**kw):
            pass


def test_launch_config_overrides_apply_and_unknown_keys_raise():
    assert kv_outer_config(64, 4, 64)["BLOCK_M"] == 64
    with tuning.override(sparse_fwd_kv_config={"BLOCK_M": 128, "num_warps": 8}):
        cfg = kv_outer_config(64, 4, 64)
        assert (cfg["BLOCK_M"], cfg["num_warps"]) == (128, 8)
    with tuning.override(sparse_fwd_kv_config={"BLOCK_Q": 128}):
        with pytest.raises(ValueError, match=r"sparse_fwd_kv_config: unknown key\(s\) \['BLOCK_Q'\]"):
            kv_outer_config(64, 4, 64)


def test_choose_kernel_follows_tuning():
    assert choose_kernel(1 << 20, 16, 16, 8192, 8192, 8192) == "kv"
    with tuning.override(sparse_fwd_kernel="qo"):
        assert choose_kernel(1 << 20, 16, 16, 8192, 8192, 8192) == "qo"


def test_env_override_parsed_once_and_strict(monkeypatch):
    monkeypatch.setenv(tuning.ENV_VAR, "sparse_fwd_kernel=qo; sparse_fwd_kv_config=BLOCK_M=128,num_warps=8;"
                                       "decode_pdl=0; kl_partial_bytes=4096")
    tuning.reset_default()
    try:
        t = tuning.current()
        assert (t.sparse_fwd_kernel, t.decode_pdl, t.kl_partial_bytes) == ("qo", False, 4096)
        assert t.sparse_fwd_kv_config == {"BLOCK_M": 128, "num_warps": 8}
        monkeypatch.setenv(tuning.ENV_VAR, "sparse_fwd_kernal=qo")
        tuning.reset_default()
        with pytest.raises(ValueError, match="MSA_TUNING: unknown or malformed entry 'sparse_fwd_kernal=qo'"):
            tuning.current()
    finally:
        monkeypatch.delenv(tuning.ENV_VAR)
        tuning.reset_default()
    assert tuning.current() == tuning.Tuning()


def test_set_default():
    try:
        tuning.set_default(sparse_bwd_dq="query")
        assert tuning.current().sparse_bwd_dq == "query"
    finally:
        tuning.reset_default()
    assert tuning.current().sparse_bwd_dq == "auto"
