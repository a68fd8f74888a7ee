"""A small decoder-only language model built from MSA attention layers (RMSNorm, SwiGLU MLP)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import MSACache
from ..layers.attention import MODES, MSAAttention, MSAConfig
from ..layers.norm import RMSNorm
from ..ops.common import check
from .generation import GenerationSession


@dataclass
class MSALMConfig:
    """vocab_size, num_layers, intermediate_size: the LM around the attention layers.
    attention: the MSAConfig of every layer. num_dense_layers: the first N layers are plain dense
    GQA without an index branch (as in MiniMax-M3). kl_weight: lambda in L = L_LM + lambda * sum of
    per-layer L_KL (a sum over layers, spec section 2)."""

    vocab_size: int = 256
    num_layers: int = 4
    intermediate_size: int = 512
    attention: MSAConfig = field(default_factory=MSAConfig)
    num_dense_layers: int = 0
    kl_weight: float = 1.0
    tie_embeddings: bool = True

    def __post_init__(self):
        check(0 <= self.num_dense_layers <= self.num_layers,
              f"num_dense_layers must be in [0, num_layers={self.num_layers}], got {self.num_dense_layers}")
        check(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")


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
    def __init__(self, config: MSALMConfig):
        super().__init__()
        self.config = config
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

    def set_mode(self, mode: str) -> None:
        """Switch every MSA layer between "dense" (warmup) and "sparse"."""
        check(mode in MODES, f"mode must be one of {MODES}, got {mode!r}")
        for layer in self.layers:
            if layer.attn.config.use_index:
                layer.attn.set_mode(mode)

    # forward ----------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None,
                cache: Optional[MSACache] = None, compute_kl: Optional[bool] = None) -> LMOutput:
        """input_ids: int64 (B, T) (packed (1, T) with cu_seqlens)."""
        check(input_ids.dim() == 2, f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        kl, sels = None, []
        for i, layer in enumerate(self.layers):
            x, out = layer(x, cu_seqlens=cu_seqlens, cache=cache, layer_idx=i, compute_kl=compute_kl)
            sels.append(out.block_indices)
            if out.kl_loss is not None:
                kl = out.kl_loss if kl is None else kl + out.kl_loss
        return LMOutput(self.lm_head(self.norm(x)).float(), kl, sels)

    def loss(self, input_ids: torch.Tensor, *, cu_seqlens: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """Next-token LM loss + kl_weight * sum of layer KLs. Returns {"loss", "lm_loss", "kl_loss"}.
        With cu_seqlens, targets never cross a sequence boundary."""
        out = self.forward(input_ids, cu_seqlens=cu_seqlens, compute_kl=True)
        logits, targets = out.logits[:, :-1], input_ids[:, 1:].clone()
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
        self.eval()
        return GenerationSession(self, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                                 generator=generator, cuda_graph=cuda_graph).run()
