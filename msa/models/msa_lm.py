"""A small decoder-only language model built from MSA attention layers (RMSNorm, SwiGLU MLP).

``MSAForCausalLM`` is a plain ``torch.nn.Module`` with its own ``save_pretrained(dir)`` /
``from_pretrained(dir)``: the config as ``config.json`` (mode included), the weights as
``model.safetensors`` when the ``safetensors`` package is importable, else as a ``torch.save`` state
dict (``pytorch_model.bin``, loaded with ``weights_only=True``). It is deliberately not a transformers
``PreTrainedModel``: transformers stays an optional extra, and the way to use MSA inside the
transformers ecosystem is to convert a Llama-family model with ``msa.hf.to_msa`` (one model family
for that world, one way to do it). This model is the self-contained one for the demo, the tests and
research on the training recipe.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from numbers import Real
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import MSACache
from ..layers.attention import KL_SUPPORTS, MODES, MSAAttention, MSAConfig
from ..layers.norm import RMSNorm
from ..ops.common import check
from .generation import GenerationSession


CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
TORCH_WEIGHTS_NAME = "pytorch_model.bin"
MODEL_TYPE = "msa_lm"
FORMAT_VERSION = 1


@dataclass
class MSALMConfig:
    """Configuration of ``MSAForCausalLM``.

    vocab_size, num_layers, intermediate_size: the LM around the attention layers (positive ints).
    attention: the MSAConfig of every layer (a dict is converted); ``attention.mode`` is the mode of
    every MSA layer ("dense" warmup or "sparse") and is what ``save_pretrained`` stores.
    num_dense_layers: the first N layers are plain dense GQA without an index branch (as in
    MiniMax-M3). kl_weight: lambda in L = L_LM + lambda * sum of per-layer L_KL (a sum over layers,
    spec section 2). tie_embeddings: the LM head shares the embedding matrix.

    ``to_dict()`` / ``from_dict()`` give a JSON-safe round trip; a pickled config (``torch.save``)
    loads under ``torch.load``'s default ``weights_only=True`` once ``msa`` is imported.
    """

    vocab_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 512
    attention: MSAConfig = field(default_factory=MSAConfig)
    num_dense_layers: int = 0
    kl_weight: float = 1.0
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "num_layers", "intermediate_size"):
            val = getattr(self, name)
            check(isinstance(val, int) and not isinstance(val, bool) and val > 0,
                  f"{name} must be a positive int, got {val!r}")
        if isinstance(self.attention, dict):
            self.attention = MSAConfig(**self.attention)
        check(isinstance(self.attention, MSAConfig),
              f"attention must be an MSAConfig (or a dict of its fields), got {type(self.attention).__name__}")
        check(isinstance(self.num_dense_layers, int) and 0 <= self.num_dense_layers <= self.num_layers,
              f"num_dense_layers must be in [0, num_layers={self.num_layers}], got {self.num_dense_layers!r}")
        check(isinstance(self.kl_weight, Real) and not isinstance(self.kl_weight, bool)
              and math.isfinite(self.kl_weight) and self.kl_weight >= 0,
              f"kl_weight must be a finite number >= 0, got {self.kl_weight!r}")
        check(isinstance(self.tie_embeddings, bool), f"tie_embeddings must be a bool, got {self.tie_embeddings!r}")

    @property
    def mode(self) -> str:
        """The mode of the MSA layers: "dense" (warmup) or "sparse" (== attention.mode)."""
        return self.attention.mode

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-safe dict of every field (attention as a nested dict)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MSALMConfig":
        """Inverse of ``to_dict``; unknown keys raise a ValueError naming them."""
        check(isinstance(data, dict), f"config must be a dict, got {type(data).__name__}")
        data = dict(data)
        att = data.get("attention", {})
        check(isinstance(att, (dict, MSAConfig)), f"attention must be a dict of MSAConfig fields, got {type(att).__name__}")
        if isinstance(att, dict):
            unknown = sorted(set(att) - {f.name for f in fields(MSAConfig)})
            check(not unknown, f"unknown MSAConfig keys in attention: {unknown}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        check(not unknown, f"unknown MSALMConfig keys: {unknown}")
        return cls(**data)

    def save_pretrained(self, save_directory: Union[str, os.PathLike]) -> str:
        """Write ``config.json`` into save_directory (created if needed); returns its path."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        from .. import __version__
        data = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, "msa_version": __version__,
                **self.to_dict()}
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=False)
            fh.write("\n")
        return path

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike]) -> "MSALMConfig":
        """Read a config saved by ``save_pretrained`` (path: the directory or the config.json file)."""
        file = os.path.join(path, CONFIG_NAME) if os.path.isdir(path) else os.fspath(path)
        check(os.path.isfile(file), f"no {CONFIG_NAME} found at {os.fspath(path)!r}")
        with open(file) as fh:
            data = json.load(fh)
        check(isinstance(data, dict) and data.pop("model_type", None) == MODEL_TYPE,
              f"{file} is not an msa config (model_type must be {MODEL_TYPE!r})")
        version = data.pop("format_version", None)
        check(version == FORMAT_VERSION, f"{file}: unsupported format_version {version!r} (this msa reads {FORMAT_VERSION})")
        data.pop("msa_version", None)
        return cls.from_dict(data)


# A pickled config (e.g. inside a torch.save checkpoint) must load under torch.load's default
# weights_only=True; the two dataclasses hold only plain Python values.
if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals([MSALMConfig, MSAConfig])


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(g) * u)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MSALMConfig, dense: bool):
        super().__init__()
        att = replace(cfg.attention, use_index=not dense, mode="dense" if dense else cfg.attention.mode)
        self.attn_norm = RMSNorm(att.hidden_size)
        self.attn = MSAAttention(att)
        self.mlp_norm = RMSNorm(att.hidden_size)
        self.mlp = SwiGLU(att.hidden_size, cfg.intermediate_size)

    def forward(self, x, **kw):
        out = self.attn(self.attn_norm(x), **kw)
        x = x + out.hidden
        return x + self.mlp(self.mlp_norm(x)), out

    def decode_step(self, x: torch.Tensor, cache: MSACache, layer_idx: int) -> torch.Tensor:
        """Device-side decode (generation hot path, see ``MSAAttention.decode_step``): x (B, t, hidden)."""
        x = x + self.attn.decode_step(self.attn_norm(x), cache, layer_idx)
        return x + self.mlp(self.mlp_norm(x))


class LMOutput(NamedTuple):
    """logits (B, T, vocab) fp32; kl_loss: sum over MSA layers of their KL (or None);
    block_indices: per-layer selections (None for dense layers / modes)."""

    logits: torch.Tensor
    kl_loss: Optional[torch.Tensor]
    block_indices: List[Optional[torch.Tensor]]


class MSAForCausalLM(nn.Module):
    """Decoder-only LM: token embedding, ``num_layers`` pre-norm blocks (MSA attention + SwiGLU MLP),
    final RMSNorm and LM head (tied to the embedding by default).

    forward(input_ids int (B, T), cu_seqlens=None, cache=None, compute_kl=None) -> LMOutput with
    logits fp32 (B, T, vocab_size). ``loss`` / ``training_step``: L = L_LM + kl_weight * sum of the
    layers' KL. ``set_mode("dense" | "sparse")`` switches every MSA layer and the config, so the mode
    is saved. ``generate`` decodes ragged prompts through a KV + index-key cache.

    Saving: ``model.save_pretrained(dir)`` and ``MSAForCausalLM.from_pretrained(dir)`` (config.json
    with the mode, weights as safetensors when available, else a torch.save state dict). This is a
    plain ``nn.Module``, not a transformers ``PreTrainedModel`` (see the module docstring): use
    ``msa.hf`` to bring MSA to transformers models.
    """

    def __init__(self, config: MSALMConfig):
        super().__init__()
        check(isinstance(config, MSALMConfig), f"config must be an MSALMConfig, got {type(config).__name__}")
        # A private copy: set_mode writes the mode into it, which must not reach another model built
        # from the same config object.
        self.config = copy.deepcopy(config)
        h = config.attention.hidden_size
        self.embed = nn.Embedding(config.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(config, dense=i < config.num_dense_layers)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(h)
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    # parameter groups -------------------------------------------------------------------------
    def index_parameters(self) -> List[nn.Parameter]:
        """Parameters of the index branches (trained only by the KL loss)."""
        return [p for n, p in self.named_parameters() if ".q_idx_" in n or ".k_idx_" in n]

    def backbone_parameters(self) -> List[nn.Parameter]:
        ids = {id(p) for p in self.index_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    @property
    def mode(self) -> str:
        """The MSA layers' mode, "dense" or "sparse" (config.attention.mode)."""
        return self.config.attention.mode

    def set_mode(self, mode: str) -> None:
        """Switch every MSA layer between "dense" (warmup) and "sparse"; the config records it, so
        ``save_pretrained`` / ``MSAForCausalLM(model.config)`` keep the mode."""
        check(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
        self.config.attention.mode = mode
        for layer in self.layers:
            if layer.attn.config.use_index:
                layer.attn.set_mode(mode)

    def _sync_mode(self) -> None:
        """Fold modes set on single layers (layer.attn.set_mode) into the config; mixed modes cannot
        be described by one config and are rejected."""
        modes = {layer.attn.config.mode for layer in self.layers if layer.attn.config.use_index}
        check(len(modes) <= 1, f"the MSA layers are in different modes {sorted(modes)}; call model.set_mode(...) "
                               "so one mode describes the model")
        if modes:
            self.config.attention.mode = modes.pop()

    # saving and loading -----------------------------------------------------------------------
    def save_pretrained(self, save_directory: Union[str, os.PathLike], *,
                        safe_serialization: Optional[bool] = None) -> None:
        """Write config.json (with the mode) and the weights into save_directory.

        safe_serialization: True writes model.safetensors (needs the safetensors package), False a
        torch.save state dict (pytorch_model.bin); None picks safetensors when importable. A weights
        file of the other format left in the directory is removed, so a reload cannot read stale weights.
        """
        check(safe_serialization in (None, True, False),
              f"safe_serialization must be None, True or False, got {safe_serialization!r}")
        have_st = _safetensors_available()
        check(not (safe_serialization is True and not have_st),
              "safe_serialization=True needs the safetensors package (pip install safetensors)")
        use_st = have_st if safe_serialization is None else safe_serialization
        self._sync_mode()
        self.config.save_pretrained(save_directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # the same tensor as embed.weight
        keep, drop = (SAFETENSORS_NAME, TORCH_WEIGHTS_NAME) if use_st else (TORCH_WEIGHTS_NAME, SAFETENSORS_NAME)
        if use_st:
            from safetensors.torch import save_file
            save_file(state, os.path.join(save_directory, keep), metadata={"format": "pt"})
        else:
            torch.save(state, os.path.join(save_directory, keep))
        stale = os.path.join(save_directory, drop)
        if os.path.exists(stale):
            os.remove(stale)

    @classmethod
    def from_pretrained(cls, load_directory: Union[str, os.PathLike], *, device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None) -> "MSAForCausalLM":
        """Load a model saved by ``save_pretrained``: its config (mode included) and weights.

        device: where to put the model (default CPU). dtype: parameter dtype (default: the saved one).
        Every saved tensor must match a parameter of the config's model and vice versa.
        """
        check(os.path.isdir(load_directory), f"load_directory must be a directory written by save_pretrained, "
                                             f"got {os.fspath(load_directory)!r}")
        config = MSALMConfig.from_pretrained(load_directory)
        st_path = os.path.join(load_directory, SAFETENSORS_NAME)
        pt_path = os.path.join(load_directory, TORCH_WEIGHTS_NAME)
        if os.path.exists(st_path):
            check(_safetensors_available(), f"{st_path} needs the safetensors package (pip install safetensors)")
            from safetensors.torch import load_file
            state = load_file(st_path, device="cpu")
        else:
            check(os.path.exists(pt_path), f"no weights in {os.fspath(load_directory)!r}: expected "
                                           f"{SAFETENSORS_NAME} or {TORCH_WEIGHTS_NAME}")
            state = torch.load(pt_path, map_location="cpu", weights_only=True)
        check(isinstance(dtype, torch.dtype) or dtype is None, f"dtype must be a torch.dtype or None, got {dtype!r}")
        if dtype is None:
            saved = {t.dtype for t in state.values() if t.is_floating_point()}
            dtype = saved.pop() if len(saved) == 1 else None
        model = cls(config)
        if dtype is not None:
            model.to(dtype=dtype)
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not (config.tie_embeddings and k == "lm_head.weight")]
        check(not missing and not unexpected, f"weights in {os.fspath(load_directory)!r} do not match the config: "
                                              f"missing {missing}, unexpected {unexpected}")
        if device is not None:
            model.to(device=device)
        return model

    # forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                cache: Optional[MSACache] = None, compute_kl: Optional[bool] = None,
                kl_support: str = "selected") -> LMOutput:
        """input_ids: int64 or int32 (B, T) token ids in [0, vocab_size) (packed (1, T) with int32
        cu_seqlens (S+1,)). cache: an ``MSACache`` with at least num_layers layers (prefill into an
        empty cache, then (B, t) decode steps). compute_kl: default = training with grad enabled.
        kl_support: "selected" (the sparse-phase KL over the selected blocks) or "full" (over every
        causal token, as in the warmup, while attention stays sparse).
        Returns LMOutput(logits fp32 (B, T, vocab_size), kl_loss fp32 scalar or None, block_indices)."""
        self._check_input_ids("input_ids", input_ids)
        check(cache is None or isinstance(cache, MSACache), f"cache must be an msa.MSACache or None, got {type(cache).__name__}")
        check(cache is None or cache.num_layers >= len(self.layers),
              f"cache holds {cache.num_layers if cache is not None else 0} layers but the model has {len(self.layers)} "
              f"(layer_idx 0..{len(self.layers) - 1}); make it with model.new_cache(...)")
        check(kl_support in KL_SUPPORTS, f"kl_support must be one of {KL_SUPPORTS}, got {kl_support!r}")
        x = self.embed(input_ids)
        kl, sels = None, []
        for i, layer in enumerate(self.layers):
            x, out = layer(x, cu_seqlens=cu_seqlens, cache=cache, layer_idx=i, compute_kl=compute_kl,
                           kl_support=kl_support)
            sels.append(out.block_indices)
            if out.kl_loss is not None:
                kl = out.kl_loss if kl is None else kl + out.kl_loss
        return LMOutput(self.lm_head(self.norm(x)).float(), kl, sels)

    def loss(self, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Next-token LM loss + kl_weight * sum of layer KLs. Returns {"loss", "lm_loss", "kl_loss"}.
        With cu_seqlens, targets never cross a sequence boundary."""
        self._check_input_ids("input_ids", input_ids)
        num_seqs = input_ids.shape[0] if cu_seqlens is None else max(1, cu_seqlens.numel() - 1)
        # Every sequence's last token predicts nothing, so a batch of one-token sequences has no
        # target at all: its mean cross-entropy would be 0/0 = NaN. That is a caller error.
        check(input_ids.numel() - num_seqs > 0,
              f"model.loss needs at least one next-token target, but every sequence in input_ids "
              f"{tuple(input_ids.shape)} holds a single token (use sequences of >= 2 tokens)")
        out = self.forward(input_ids, cu_seqlens=cu_seqlens, compute_kl=True)
        logits, targets = out.logits[:, :-1], input_ids[:, 1:].long().clone()
        if cu_seqlens is not None:
            ends = cu_seqlens[1:-1].to(torch.int64) - 1  # last token of each sequence predicts nothing
            targets[0, ends] = -100
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        kl = out.kl_loss if out.kl_loss is not None else lm.new_zeros(())
        return {"loss": lm + self.config.kl_weight * kl, "lm_loss": lm, "kl_loss": kl}

    def training_step(self, input_ids: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                      cu_seqlens: Optional[torch.Tensor] = None, grad_clip: float = 1.0,
                      autocast_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
        """One optimizer step on L = L_LM + lambda * sum_l L_KL. Returns the float losses.
        autocast_dtype (e.g. torch.bfloat16 on a GPU): the forward runs under torch.autocast, so the
        attention kernels get 16-bit inputs (fp32 inputs take their exact, much slower fp32 path);
        the parameters and the optimizer stay fp32."""
        check(autocast_dtype in (None, torch.bfloat16, torch.float16),
              f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}")
        self.train()
        with torch.autocast(input_ids.device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            losses = self.loss(input_ids, cu_seqlens=cu_seqlens)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.backbone_parameters(), grad_clip)
            torch.nn.utils.clip_grad_norm_(self.index_parameters(), grad_clip)
        optimizer.step()
        return {k: float(v.detach()) for k, v in losses.items()}

    # generation -------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_seq_len: int, *, paged: bool = False,
                  index_dtype: Optional[torch.dtype] = None, index_scale_mode: str = "token") -> MSACache:
        """An empty cache for generation. paged=True uses pages of block_size tokens (block ids are
        page ids); index_dtype=torch.float8_e4m3fn stores the index keys in fp8 with per-token or
        per-block scales (index_scale_mode)."""
        a = self.config.attention
        p = self.embed.weight
        return MSACache(self.config.num_layers, batch_size, max_seq_len, a.num_kv_heads, a.head_dim, a.index_dim,
                        dtype=p.dtype, device=p.device, page_size=a.block_size if paged else None,
                        index_dtype=index_dtype, index_scale_mode=index_scale_mode,
                        index_block_size=a.block_size)

    def decode_step(self, input_ids: torch.Tensor, cache: MSACache) -> torch.Tensor:
        """One device-side decode step (the body ``generate`` replays): input_ids int64 (B, t) of t new
        tokens per sequence, appended to ``cache`` after each sequence's device length. No validation and
        no host sync (capturable in a CUDA graph); the caller checked the inputs once.
        Returns the fp32 logits (B, vocab) of each sequence's last new token."""
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer.decode_step(x, cache, i)
        return self.lm_head(self.norm(x[:, -1])).float()

    @torch.no_grad()
    def generate(self, prompts: Union[torch.Tensor, Sequence[torch.Tensor]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cuda_graph: bool = True) -> List[torch.Tensor]:
        """Generate from one or more prompts of any lengths (a (B, T) int tensor or a list of 1-D int
        tensors, token ids in [0, vocab_size)). Prompts are prefilled as one packed batch into a fresh
        cache, then decoded together on the device (``msa.models.generation``): inputs are validated
        once here, each decode plan is built once, and no step syncs the host.
        temperature 0 is greedy; otherwise softmax(logits / temperature) sampling, optionally over the
        top_k largest logits, with ``generator`` (on the model's device) if given.
        cuda_graph: on CUDA, capture the per-token step (every layer, the lm head and the pick) in a
        CUDA graph and replay it; False runs the same step eagerly (same greedy tokens).
        Returns B int64 tensors of max_new_tokens tokens each, on the model's device."""
        self._check_generate_args(prompts, max_new_tokens, temperature, top_k)
        self.eval()
        return GenerationSession(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                 generator=generator, cuda_graph=cuda_graph).run()

    # argument checks ---------------------------------------------------------------------------
    def _check_token_values(self, name: str, ids: torch.Tensor) -> None:
        """Token ids in [0, vocab_size). Skipped while capturing a CUDA graph or compiling (it syncs)."""
        if ids.numel() == 0 or torch.compiler.is_compiling() or (
                ids.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        lo, hi = (int(x) for x in torch.aminmax(ids))
        check(lo >= 0 and hi < self.config.vocab_size,
              f"{name} must hold token ids in [0, vocab_size={self.config.vocab_size}), got values in [{lo}, {hi}]")

    def _check_input_ids(self, name: str, ids) -> None:
        check(isinstance(ids, torch.Tensor), f"{name} must be a torch.Tensor of token ids (B, T), got {type(ids).__name__}")
        check(ids.dim() == 2, f"{name} must have shape (B, T), got {tuple(ids.shape)}")
        check(ids.dtype in (torch.int64, torch.int32),
              f"{name} must be an integer tensor (int64 or int32), got {ids.dtype}")
        check(ids.shape[1] >= 1, f"{name} must hold at least one token (T >= 1), got shape {tuple(ids.shape)}")
        self._check_token_values(name, ids)

    def _check_generate_args(self, prompts, max_new_tokens, temperature, top_k) -> None:
        """generate()'s arguments, checked before anything runs."""
        if isinstance(prompts, torch.Tensor):
            check(prompts.dim() == 2, f"prompts must be a (B, T) tensor or a list of 1-D tensors, got shape "
                                      f"{tuple(prompts.shape)}")
            rows = [("prompts", prompts)]
        else:
            check(isinstance(prompts, (list, tuple)),
                  f"prompts must be a (B, T) torch.Tensor of token ids or a list of 1-D ones, got {type(prompts).__name__}")
            check(len(prompts) > 0, "prompts must hold at least one prompt")
            for i, p in enumerate(prompts):
                check(isinstance(p, torch.Tensor),
                      f"prompts[{i}] must be a 1-D torch.Tensor of token ids, got {type(p).__name__}")
                check(p.dim() == 1 and p.numel() > 0, f"prompts[{i}] must be a non-empty 1-D tensor, got shape {tuple(p.shape)}")
            rows = [(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
        for name, p in rows:
            check(p.dtype in (torch.int64, torch.int32),
                  f"{name} must be an integer tensor of token ids (int64), got {p.dtype}")
            check(p.numel() > 0, f"{name} must not be empty")
            self._check_token_values(name, p)
        check(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1,
              f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        check(isinstance(temperature, Real) and not isinstance(temperature, bool) and math.isfinite(temperature)
              and temperature >= 0, f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        check(top_k is None or (isinstance(top_k, int) and not isinstance(top_k, bool)
                                and 1 <= top_k <= self.config.vocab_size),
              f"top_k must be None or an int in [1, vocab_size={self.config.vocab_size}], got {top_k!r}")



def _safetensors_available() -> bool:
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True
