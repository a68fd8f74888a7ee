"""A transformers ``Cache`` backed by ``msa.MSACache`` (K, V and the index keys of every layer).

transformers counts cache *slots* (a left-padded prompt of 7 slots with 3 pads is 7 slots); msa stores only each
sequence's own tokens, so every sequence's positions and key blocks start at its own first token. The slot count
per layer is what ``get_seq_length`` / ``get_mask_sizes`` report to transformers; ``store.seq_lens(layer)`` holds
the real per-sequence lengths the decode kernels use.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import MSACache
from ..ops.common import check, triton_available
from ..ops.decode import decode_attention


class MSACacheLayer(CacheLayerMixin):
    """One layer's view of an ``MSAHFCache``: only transformers' bookkeeping (slots seen)."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self):
        super().__init__()
        self.slots = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise ValueError("MSAHFCache is filled by msa's attention layers (msa.hf.to_msa); it cannot store keys "
                         "for other attention code")

    def get_mask_sizes(self, query_length: int):
        return self.slots + query_length, 0

    def get_seq_length(self) -> int:
        return self.slots

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.slots = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("MSAHFCache does not support beam search (reorder_cache); use greedy or sampling")


class MSAHFCache(Cache):
    """KV + index-key cache for models converted by ``msa.hf.to_msa``; ``generate()`` makes one by itself.

    Args:
        num_layers: decoder layers of the model.
        num_kv_heads, head_dim: K / V shape per token (H_kv, D).
        index_dim: D_idx of the index keys (None for a model without sparse layers).
        max_cache_len: tokens per sequence to allocate at the first prefill (None: the prefill's length plus
            256; the storage grows, by copying, when a sequence outgrows it).
        index_dtype: None (the model's dtype) or torch.float8_e4m3fn (fp8 index keys, per-token scales).
        cuda_graphs: in ``generate()`` on CUDA, capture one decode step of the whole model in a CUDA graph (at the
            third step; the second runs eagerly to build the kernels and buffers) and replay it for the later
            steps; falls back to eager steps when the capture fails or the storage must grow.

    The storage (``self.store``, an ``msa.MSACache``) is created at the first prefill, with that batch's size,
    dtype and device. Beam search, cropping and batch re-ordering are not supported.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, index_dim: Optional[int], *,
                 max_cache_len: Optional[int] = None, index_dtype: Optional[torch.dtype] = None,
                 cuda_graphs: bool = True):
        check(isinstance(num_layers, int) and num_layers > 0, f"num_layers must be a positive int, got {num_layers!r}")
        check(max_cache_len is None or (isinstance(max_cache_len, int) and max_cache_len > 0),
              f"max_cache_len must be a positive int or None, got {max_cache_len!r}")
        super().__init__(layers=[MSACacheLayer() for _ in range(num_layers)])
        self.num_kv_heads, self.head_dim, self.index_dim = num_kv_heads, head_dim, index_dim
        self.max_cache_len, self.index_dtype = max_cache_len, index_dtype
        self.store: Optional[MSACache] = None
        self._plans: Dict[Tuple, object] = {}
        self.cuda_graphs = bool(cuda_graphs)
        self._graph: Optional[dict] = None
        self._graph_failed = False
        self._capturing = False
        self._eager_decode_steps = 0

    @classmethod
    def for_model(cls, model, *, max_cache_len: Optional[int] = None, index_dtype: Optional[torch.dtype] = None,
                  cuda_graphs: bool = True) -> "MSAHFCache":
        """An empty cache shaped for a model converted by ``msa.hf.to_msa``."""
        from .convert import msa_settings
        return cls.from_settings(msa_settings(model), max_cache_len=max_cache_len, index_dtype=index_dtype,
                                 cuda_graphs=cuda_graphs)

    @classmethod
    def from_settings(cls, s, *, max_cache_len: Optional[int] = None, index_dtype: Optional[torch.dtype] = None,
                      cuda_graphs: bool = True) -> "MSAHFCache":
        """An empty cache for the ``msa.hf.MSASettings`` s of a converted model."""
        return cls(s.num_layers, s.num_kv_heads, s.head_dim, s.index_dim if s.sparse_layers else None,
                   max_cache_len=max_cache_len, index_dtype=index_dtype, cuda_graphs=cuda_graphs)

    # transformers API -----------------------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.store = None
        self._plans = {}
        self._graph = None
        self._eager_decode_steps = 0

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("MSAHFCache cannot be cropped (assisted / speculative generation is not supported)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("MSAHFCache cannot repeat its batch (beam search / contrastive search)")

    def batch_select_indices(self, indices) -> None:
        raise NotImplementedError("MSAHFCache cannot select batch rows")

    # msa side -------------------------------------------------------------------------------------------
    def is_empty(self, layer_idx: int) -> bool:
        """True when layer ``layer_idx`` holds no tokens yet (the next forward is a prefill)."""
        return self.layers[layer_idx].slots == 0

    def _ensure(self, batch: int, need: int, dtype: torch.dtype, device: torch.device) -> MSACache:
        st = self.store
        if st is not None:
            check(st.batch_size == batch, f"the cache holds {st.batch_size} sequences, this forward has {batch}")
            if need <= st.max_seq_len:
                return st
        cap = max(need, self.max_cache_len or 0)
        if st is None:
            cap = max(cap, need + 256) if self.max_cache_len is None else cap
        else:
            cap = max(cap, 2 * st.max_seq_len)
        new = MSACache(len(self.layers), batch, cap, self.num_kv_heads, self.head_dim, self.index_dim,
                       dtype=dtype, device=device, index_dtype=self.index_dtype)
        if st is not None:  # grow: copy every sequence of every layer
            for li in range(st.num_layers):
                for row in range(batch):
                    k, v, kidx = st.view(li, row)
                    if k.shape[0]:
                        new.append_row(li, row, k, v, kidx)
        self.store = new
        self._plans = {}  # plans and graphs hold the old storage; the next decode step runs eagerly first
        self._graph = None
        self._eager_decode_steps = 0
        return new

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, k_idx: Optional[torch.Tensor], *,
               batch: int, slots: int, cu_seqlens: Optional[torch.Tensor] = None) -> MSACache:
        """Store new tokens of layer ``layer_idx`` and count ``slots`` transformers slots.

        k, v: (B, t, H_kv, D) or packed (1, N, H_kv, D) with cu_seqlens int32 (batch + 1,); k_idx: (B, t, D_idx),
        (1, N, D_idx) or None. Returns the storage (``msa.MSACache``)."""
        layer = self.layers[layer_idx]
        if self._capturing:  # inside a CUDA-graph capture: device-side lengths only, no host work
            self.store.append_device(layer_idx, k, v, k_idx)
            layer.slots += slots
            return self.store
        if cu_seqlens is None:
            new_len = k.shape[1]
            lens = self.store.seq_lens(layer_idx) if self.store is not None else torch.zeros(batch, dtype=torch.int64)
            need = int(lens.max()) + new_len
        else:
            seg = (cu_seqlens[1:] - cu_seqlens[:-1]).cpu().to(torch.int64)
            lens = self.store.seq_lens(layer_idx) if self.store is not None else torch.zeros(batch, dtype=torch.int64)
            need = int((lens + seg).max())
        st = self._ensure(batch, need, k.dtype, k.device)
        st.append(layer_idx, k, v, k_idx, cu_seqlens=cu_seqlens)
        layer.slots += slots
        layer.is_initialized = True
        return st

    def decode(self, layer_idx: int, q: torch.Tensor, q_idx: Optional[torch.Tensor], *, block_size: int, topk: int,
               init_blocks: int, local_blocks: int, scale: float, index_scale: float, dense: bool) -> torch.Tensor:
        """Attention of the t newest tokens of layer ``layer_idx`` (already appended) over the stored ones.

        q: (B, t, H_q, D); q_idx: (B, t, H_kv, D_idx) or None when dense. Returns o (B, t, H_q, D) in q.dtype.
        On CUDA one ``DecodePlan`` (buffers and launch geometry, built once per storage and step shape) serves
        every layer and step; elsewhere ``msa.decode_attention`` (the PyTorch reference on CPU)."""
        st = self.store
        sel = dict(block_size=block_size, topk=topk, init_blocks=init_blocks, local_blocks=local_blocks,
                   scale=scale, index_scale=index_scale)
        kernel_ok = block_size >= 16 and block_size & (block_size - 1) == 0  # the Triton decode kernels' blocks
        if q.is_cuda and triton_available() and q.dtype == st.dtype and kernel_ok:
            key = (dense, q.shape[2], q.shape[1], block_size, topk, init_blocks, local_blocks, scale, index_scale)
            plan = self._plans.get(key)
            if plan is None:
                from ..ops.decode.triton_impl import DecodePlan
                plan = DecodePlan(st, num_heads=q.shape[2], num_tokens=q.shape[1], dense=dense, out_dtype=q.dtype,
                                  **sel)
                self._plans[key] = plan
            qi = None if dense else q_idx.to(st.dtype)
            if hasattr(plan, "check_inputs"):  # host metadata only, no sync
                plan.check_inputs(q, qi, layer_idx)
            o, _ = plan.run(q, qi, layer_idx)
            return o
        o, _ = decode_attention(q, None if dense else q_idx, st, layer_idx, dense=dense,
                                backend="auto" if kernel_ok else "reference", **sel)
        return o

    def seq_lens(self, layer_idx: int) -> List[int]:
        """Tokens stored per sequence in layer ``layer_idx`` (pads excluded)."""
        return [] if self.store is None else self.store.seq_lens(layer_idx).tolist()

    # CUDA graphs ---------------------------------------------------------------------------------------
    _GRAPH_KWARGS = {"input_ids", "position_ids", "cache", "use_cache", "return_dict", "logits_to_keep",
                     "attention_mask"}

    def _graph_eligible(self, model, kw) -> bool:
        ids, pos, st = kw.get("input_ids"), kw.get("position_ids"), self.store
        return (self.cuda_graphs and not self._graph_failed and st is not None and st.device.type == "cuda"
                and isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == 1
                and isinstance(pos, torch.Tensor) and pos.shape == ids.shape
                and all(k in self._GRAPH_KWARGS or v is None or v is False for k, v in kw.items())
                and not model.training and not torch.is_grad_enabled()
                and not (st.fp8_index and st.index_scale_mode == "block")
                and all(lay.slots > 0 for lay in self.layers)
                and max(int(st.seq_lens(li).max()) for li in range(st.num_layers)) + 1 <= st.max_seq_len)

    def graph_step(self, model, kw):
        """One decode step of ``model`` (a forward with one new token per sequence) through a CUDA graph when
        possible, else eagerly. The graph's inputs are the token ids and positions; the attention mask is not
        read (every appended token is a real token)."""
        if not self._graph_eligible(model, kw):
            return model(**kw)
        ids, pos = kw["input_ids"], kw["position_ids"]
        g = self._graph
        if g is None or g["ids"].shape != ids.shape:
            if self._eager_decode_steps < 1:  # builds the decode plans and compiles the kernels
                self._eager_decode_steps += 1
                return model(**kw)
            g = self._capture(model, ids, pos)
            if g is None:
                return model(**kw)
        g["ids"].copy_(ids)
        g["pos"].copy_(pos)
        g["graph"].replay()
        for lay in self.layers:
            lay.slots += 1
        host = getattr(self.store, "lengths", None)
        if isinstance(host, list):  # host copies of the device lengths the graph advanced, without a sync
            for lens in host:
                lens.add_(1)
        else:
            self.store.sync_lengths()
        from transformers.modeling_outputs import CausalLMOutputWithPast
        return CausalLMOutputWithPast(logits=g["logits"].clone(), cache=self)

    def _capture(self, model, ids, pos) -> Optional[dict]:
        slots = [lay.slots for lay in self.layers]
        static_ids, static_pos = ids.clone(), pos.clone()
        graph = torch.cuda.CUDAGraph()
        self._capturing = True
        try:
            with torch.cuda.graph(graph):
                out = model(input_ids=static_ids, position_ids=static_pos, cache=self, use_cache=True,
                            return_dict=True, logits_to_keep=1)
        except Exception as exc:  # pragma: no cover - depends on the model's code and the GPU
            import warnings
            warnings.warn(f"msa.hf: capturing the decode step in a CUDA graph failed ({exc!r}); decoding eagerly")
            self._graph_failed = True
            return None
        finally:
            self._capturing = False
            for lay, n in zip(self.layers, slots):
                lay.slots = n
        self._graph = {"graph": graph, "ids": static_ids, "pos": static_pos, "logits": out.logits}
        return self._graph
