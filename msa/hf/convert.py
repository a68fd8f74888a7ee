"""Converting transformers causal LMs to MSA, switching modes, the KL term, and saving / loading.

Supported: ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, ``MistralForCausalLM`` (an index
branch is added) and transformers' MiniMax-M3 text model (``MiniMaxM3VLForCausalLM``, whose own indexer weights
are used). The conversion is in place: each attention module gets msa's forward (``msa.hf.attention``), the
model's text config gets ``attn_implementation="msa"`` (so the model hands its layers the plain 2D padding
mask instead of building a dense (T, T) mask) and the MSA settings under the serving stacks' names.
"""

from __future__ import annotations

import json
import os
import types
import warnings
from typing import Dict, List, Optional

import torch
from torch import nn

from ..layers.norm import RMSNorm
from ..ops.common import check, check_block_args
from .attention import MODES, MSASettings, _LayerState, _Shared, msa_attention_forward, register
from .cache import MSAHFCache

CONVERTIBLE = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")
M3_ATTENTION = "MiniMaxM3VLAttention"
# keys written to the text config (config.json); the names follow vLLM / SGLang's MiniMax-M3 config
CONFIG_KEYS = ("sparse_block_size", "sparse_topk_blocks", "sparse_index_dim", "sparse_num_index_heads",
               "sparse_init_blocks", "sparse_local_blocks", "sparse_index_norm_rope", "sparse_attention_freq",
               "sparse_mode", "sparse_kind")


def _attention_modules(model: nn.Module) -> List[nn.Module]:
    mods = [m for m in model.modules() if type(m).__name__ in CONVERTIBLE + (M3_ATTENTION,)]
    return sorted(mods, key=lambda m: m.layer_idx)


def _converted(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if hasattr(m, "_msa")]


def msa_settings(model: nn.Module) -> MSASettings:
    """The ``MSASettings`` of a model converted by ``to_msa`` (shared by all its layers)."""
    mods = _converted(model)
    check(len(mods) > 0, "the model is not converted to MSA: call msa.hf.to_msa(model) first")
    return mods[0]._msa.settings


def _pick(given, default):
    return default if given is None else given


def to_msa(model: nn.Module, *, block_size: Optional[int] = None, topk_blocks: Optional[int] = None,
           index_dim: Optional[int] = None, init_blocks: Optional[int] = None, local_blocks: Optional[int] = None,
           num_dense_layers: Optional[int] = None, index_norm_rope: Optional[bool] = None,
           mode: Optional[str] = None) -> nn.Module:
    """Convert a transformers causal LM to MiniMax Sparse Attention, in place; returns the model.

    Llama / Qwen2 / Qwen3 / Mistral: every attention layer except the first ``num_dense_layers`` gets an index
    branch (one index query head per KV group, ``q_idx_proj`` (hidden -> H_kv * index_dim), and one shared
    index key head, ``k_idx_proj`` (hidden -> index_dim), both reading the detached hidden state; normal(0,
    initializer_range) init, in the dtype and device of the layer's q_proj). Defaults: block_size=128,
    topk_blocks=16, index_dim=128, init_blocks=0, local_blocks=1, num_dense_layers=0, index_norm_rope=False
    (True adds MiniMax-M3's RMSNorm (1 + w) and the model's partial RoPE on q_idx and k_idx), mode="dense" (full
    causal attention, logits equal to the original model's; the KL trains the indexer) or "sparse".

    MiniMax-M3 (``MiniMaxM3VLForCausalLM``): the sparse layers (``layer_types == "minimax_m3_sparse"``) run
    through msa with the model's own indexer and settings (index_norm_rope, unscaled index scores); arguments
    other than ``mode`` must be left None or equal the model's config. Default mode "sparse".

    Every attention layer (sparse or dense) then runs through msa's ops and its cache (``MSAHFCache``).
    """
    register()
    check(not _converted(model), "the model is already converted to MSA (to_msa was called before)")
    attn = _attention_modules(model)
    kinds = {type(m).__name__ for m in attn}
    check(len(attn) > 0, f"to_msa supports LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM "
                         f"and MiniMaxM3VLForCausalLM; {type(model).__name__} has no supported attention module")
    check(len(kinds) == 1, f"the model mixes attention classes {sorted(kinds)}")
    cfg = attn[0].config
    num_layers = cfg.num_hidden_layers
    check(len(attn) == num_layers, f"found {len(attn)} attention modules for num_hidden_layers={num_layers}")
    num_kv_heads = cfg.num_key_value_heads
    head_dim = attn[0].head_dim
    check(mode is None or mode in MODES, f"mode must be one of {MODES}, got {mode!r}")

    if kinds == {M3_ATTENTION}:
        m3 = dict(block_size=cfg.index_block_size, topk_blocks=cfg.index_topk_blocks, index_dim=cfg.index_head_dim,
                  init_blocks=0, local_blocks=cfg.index_local_blocks, index_norm_rope=True)
        given = dict(block_size=block_size, topk_blocks=topk_blocks, index_dim=index_dim, init_blocks=init_blocks,
                     local_blocks=local_blocks, index_norm_rope=index_norm_rope)
        for name, val in given.items():
            check(val is None or val == m3[name],
                  f"{name}={val!r} differs from the MiniMax-M3 config's value {m3[name]!r}; leave it None")
        sparse_layers = [i for i, lt in enumerate(cfg.layer_types) if lt == "minimax_m3_sparse"]
        check(num_dense_layers is None or all(i >= num_dense_layers for i in sparse_layers),
              "num_dense_layers conflicts with the MiniMax-M3 config's layer_types; leave it None")
        check(cfg.index_n_heads == num_kv_heads,
              f"MSA selects per KV group: index_n_heads ({cfg.index_n_heads}) must equal num_key_value_heads "
              f"({num_kv_heads})")
        settings = MSASettings(kind="minimax_m3", num_index_heads=cfg.index_n_heads, index_scale=1.0,
                               sparse_layers=sparse_layers, mode=mode or "sparse", num_layers=num_layers,
                               num_kv_heads=num_kv_heads, head_dim=head_dim, **m3)
    else:
        block_size, topk_blocks = _pick(block_size, 128), _pick(topk_blocks, 16)
        index_dim, init_blocks = _pick(index_dim, 128), _pick(init_blocks, 0)
        local_blocks = _pick(local_blocks, 1)
        num_dense_layers = _pick(num_dense_layers, 0)
        check_block_args(block_size, topk_blocks, init_blocks, local_blocks)
        check(isinstance(index_dim, int) and not isinstance(index_dim, bool) and index_dim > 0 and index_dim % 2 == 0,
              f"index_dim must be a positive even int, got {index_dim!r}")
        check(isinstance(num_dense_layers, int) and 0 <= num_dense_layers <= num_layers,
              f"num_dense_layers must be an int in [0, num_hidden_layers={num_layers}], got {num_dense_layers!r}")
        sliding = getattr(cfg, "sliding_window", None) if "MistralAttention" in kinds else \
            next((m.sliding_window for m in attn if getattr(m, "sliding_window", None)), None)
        if sliding:
            warnings.warn(f"the model uses sliding-window attention (window {sliding}); its MSA layers attend to "
                          "the whole causal history (dense mode) or MSA's selected blocks (sparse mode), so dense-mode "
                          "logits equal the original model's only for sequences up to the window", stacklevel=2)
        if float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
            warnings.warn("msa attention has no attention dropout; the model's attention_dropout is ignored",
                          stacklevel=2)
        settings = MSASettings(kind="converted", block_size=block_size, topk_blocks=topk_blocks, index_dim=index_dim,
                               num_index_heads=num_kv_heads, init_blocks=init_blocks, local_blocks=local_blocks,
                               index_norm_rope=bool(index_norm_rope), index_scale=None,
                               sparse_layers=list(range(num_dense_layers, num_layers)), mode=mode or "dense",
                               num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim)

    shared = _Shared()
    for m in attn:
        sparse = m.layer_idx in settings.sparse_layers
        if sparse and settings.kind == "converted":
            _add_index_branch(m, settings, cfg)
        m._msa = _LayerState(settings=settings, layer_idx=m.layer_idx, sparse=sparse, shared=shared)
        m.forward = types.MethodType(msa_attention_forward, m)
    for c in {id(m.config): m.config for m in attn}.values():
        c._attn_implementation = "msa"
        _write_config(c, settings)
    for stack in _decoder_stacks(model, attn):
        stack.register_forward_pre_hook(_make_stack_hook(settings, shared), with_kwargs=True)
    model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
    model._valid_auto_compile_criteria = types.MethodType(_valid_auto_compile_criteria, model)
    model.get_compiled_call = types.MethodType(_get_compiled_call, model)
    return model


def _add_index_branch(m: nn.Module, s: MSASettings, cfg) -> None:
    w = m.q_proj.weight
    std = getattr(cfg, "initializer_range", 0.02)
    m.q_idx_proj = nn.Linear(cfg.hidden_size, s.num_index_heads * s.index_dim, bias=False, device=w.device,
                             dtype=w.dtype)
    m.k_idx_proj = nn.Linear(cfg.hidden_size, s.index_dim, bias=False, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        nn.init.normal_(m.q_idx_proj.weight, std=std)
        nn.init.normal_(m.k_idx_proj.weight, std=std)
    if s.index_norm_rope:
        eps = getattr(cfg, "rms_norm_eps", 1e-6)
        m.q_idx_norm = RMSNorm(s.index_dim, eps=eps, unit_offset=True).to(device=w.device, dtype=w.dtype)
        m.k_idx_norm = RMSNorm(s.index_dim, eps=eps, unit_offset=True).to(device=w.device, dtype=w.dtype)


def _write_config(c, s: MSASettings) -> None:
    c.sparse_block_size = s.block_size
    c.sparse_topk_blocks = s.topk_blocks
    c.sparse_index_dim = s.index_dim
    c.sparse_num_index_heads = s.num_index_heads
    c.sparse_init_blocks = s.init_blocks
    c.sparse_local_blocks = s.local_blocks
    c.sparse_index_norm_rope = s.index_norm_rope
    c.sparse_attention_freq = [int(i in s.sparse_layers) for i in range(s.num_layers)]
    c.sparse_mode = s.mode
    c.sparse_kind = s.kind


def _decoder_stacks(model: nn.Module, attn: List[nn.Module]) -> List[nn.Module]:
    ids = {id(m) for m in attn}
    out = []
    for mod in model.modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, nn.ModuleList) and any(id(getattr(lay, "self_attn", None)) in ids for lay in layers):
            out.append(mod)
    return out


def _make_stack_hook(settings: MSASettings, shared: _Shared):
    def hook(module, args, kwargs):
        """Start of a decoder forward: forget the previous forward's layout (its mask / position tensors may be
        refilled in place), and give the decoder an MSAHFCache where transformers would make a DynamicCache."""
        shared.clear()
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            return args, kwargs
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(module.config, "use_cache", False)) and not module.training
            pos = kwargs.get("position_ids")
            if (use_cache and isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] > 1
                    and kwargs.get("attention_mask") is None and bool((pos[:, 1:] != pos[:, :-1] + 1).any())):
                use_cache = False  # packed documents: a cache holds one sequence per row, so make none
            kwargs["use_cache"] = use_cache
        if use_cache:
            kwargs["cache"] = MSAHFCache.from_settings(settings)
        return args, kwargs
    return hook


def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                  max_cache_length) -> None:
    """generate(): an MSAHFCache sized for the whole generation instead of transformers' DynamicCache."""
    user = model_kwargs.get("cache")
    if user is not None:
        check(isinstance(user, MSAHFCache), f"an MSA model generates with an msa.hf.MSAHFCache, got {type(user).__name__}")
        user._is_user_defined = True
        return
    if generation_config.use_cache is False:
        return
    check(generation_config.cache_implementation in (None, "dynamic"),
          f"cache_implementation={generation_config.cache_implementation!r} is not supported by MSA models "
          "(they use msa.hf.MSAHFCache)")
    check((generation_config.num_beams or 1) == 1, "MSA models do not support beam search (num_beams > 1)")
    model_kwargs["cache"] = MSAHFCache.from_settings(msa_settings(self), max_cache_len=int(max_cache_length) + 1)


def _valid_auto_compile_criteria(self, model_kwargs, generation_config) -> bool:
    """generate(): decode steps go through MSAHFCache.graph_step (CUDA graphs) instead of torch.compile."""
    cache = model_kwargs.get("cache")
    return isinstance(cache, MSAHFCache) and cache.cuda_graphs and not generation_config.disable_compile


def _get_compiled_call(self, compile_config=None):
    model = self

    def call(**kw):
        cache = kw.get("cache")
        if isinstance(cache, MSAHFCache):
            return cache.graph_step(model, kw)
        return model(**kw)
    return call


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every sparse layer between "dense" (full causal attention + full-support KL: the warmup) and
    "sparse" (MSA's selection + sparse attention). The mode is saved with the model (config ``sparse_mode``)."""
    check(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
    s = msa_settings(model)
    s.mode = mode
    for c in {id(m.config): m.config for m in _converted(model)}.values():
        c.sparse_mode = mode


def kl_loss(model: nn.Module) -> torch.Tensor:
    """fp32 scalar: the sum over sparse layers of the last forward's indexer KL (``msa.indexer_kl_loss``; the
    teacher is the layer's detached attention, the student the index scores over the same support). Add it with
    a weight lambda to the LM loss: its gradient reaches only the index parameters. Computed by forwards in
    training mode with gradients enabled."""
    kls = [m._msa.kl for m in _converted(model) if m._msa.kl is not None]
    check(len(kls) > 0, "no KL terms: run a forward in training mode (model.train()) with gradients enabled "
                        "first (the model needs at least one sparse layer)")
    total = kls[0]
    for kl in kls[1:]:
        total = total + kl.to(total.device)
    return total


def index_parameters(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of the index branches (the ones the KL trains; the LM loss never reaches them)."""
    out = []
    for m in _converted(model):
        if not m._msa.sparse:
            continue
        if m._msa.settings.kind == "minimax_m3":
            out.extend(m.indexer.parameters())
        else:
            for name in ("q_idx_proj", "k_idx_proj", "q_idx_norm", "k_idx_norm"):
                sub = getattr(m, name, None)
                if sub is not None:
                    out.extend(sub.parameters())
    return out


def _index_param_names(model: nn.Module) -> List[str]:
    ids = {id(p) for p in index_parameters(model)}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _read_tensors(path: str, names: List[str]) -> Dict[str, torch.Tensor]:
    from safetensors import safe_open
    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    else:
        weight_map = {n: "model.safetensors" for n in names}
    out: Dict[str, torch.Tensor] = {}
    by_file: Dict[str, List[str]] = {}
    for n in names:
        check(n in weight_map, f"{path} holds no tensor {n!r} (was it saved from an MSA model?)")
        by_file.setdefault(weight_map[n], []).append(n)
    for fname, keys in by_file.items():
        with safe_open(os.path.join(path, fname), framework="pt") as f:
            have = set(f.keys())
            for n in keys:
                check(n in have, f"{os.path.join(path, fname)} holds no tensor {n!r}")
                out[n] = f.get_tensor(n)
    return out


def from_pretrained(path: str, **kwargs) -> nn.Module:
    """Load a model saved (``save_pretrained``) after ``msa.hf.to_msa``: the weights (index branch included), the
    mode and the MSA settings, read from config.json (``sparse_*`` keys). ``kwargs`` go to transformers'
    ``from_pretrained`` of the saved architecture (e.g. ``dtype=torch.bfloat16``, ``device_map="cuda"``)."""
    import logging

    import transformers
    from transformers import AutoConfig

    register()
    config = AutoConfig.from_pretrained(path)
    text = config.get_text_config(decoder=True)
    check(getattr(text, "sparse_block_size", None) is not None,
          f"{path}/config.json has no MSA settings (sparse_block_size ...): it was not saved from an MSA model")
    archs = getattr(config, "architectures", None) or []
    check(len(archs) == 1 and hasattr(transformers, archs[0]),
          f"config.json must name one transformers architecture, got {archs!r}")
    cls = getattr(transformers, archs[0])
    freq = list(text.sparse_attention_freq)
    kind = getattr(text, "sparse_kind", "converted")
    # the index weights are not part of the original architecture: load them below, without the unused-weights report
    log = logging.getLogger("transformers.modeling_utils")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        model = cls.from_pretrained(path, **kwargs)
    finally:
        log.setLevel(level)
    if kind == "minimax_m3":
        to_msa(model, mode=text.sparse_mode)
    else:
        dense = freq.index(1) if 1 in freq else len(freq)
        check(freq == [0] * dense + [1] * (len(freq) - dense),
              f"sparse_attention_freq must be dense layers then sparse layers for a converted model, got {freq}")
        to_msa(model, block_size=text.sparse_block_size, topk_blocks=text.sparse_topk_blocks,
               index_dim=text.sparse_index_dim, init_blocks=text.sparse_init_blocks,
               local_blocks=text.sparse_local_blocks, num_dense_layers=dense,
               index_norm_rope=bool(text.sparse_index_norm_rope), mode=text.sparse_mode)
        names = _index_param_names(model)
        tensors = _read_tensors(path, names)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in names:
                params[n].copy_(tensors[n].to(dtype=params[n].dtype, device=params[n].device))
    return model

