"""Generation for ``MSAForCausalLM``: one validated session per ``generate()`` call.

A session validates its inputs once, prefills the prompts as one packed batch into a fresh cache, and
then runs the per-token step on the device: each layer's ``decode_step`` (positions from the cache's
device lengths, K/V/index keys appended with ``append_device``, the attention through the cache's
memoised decode plans: one per kind of layer for the whole generation), the final norm, the lm head
and the token pick (greedy argmax, or a temperature / top-k sample drawn on the device). The step
writes its token into a device buffer and feeds it to the next step, so the loop never syncs the host.

On CUDA the step is captured once in a CUDA graph and replayed per token (``cuda_graph=True``); the
uncaptured path runs the same code eagerly. Sequences of different prompt lengths share one graph: the
kernels read each sequence's length on the device.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

import torch.nn.functional as F

from ..layers.rope import rotary_cos_sin
from ..ops.common import check, resolve_backend
from ..ops.decode import decode_attention_step

WARMUP_STEPS = 2  # eager steps (rolled back) before a capture: Triton compiles, cuBLAS / allocator set-up


def pick_tokens(logits: torch.Tensor, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits fp32 (B, V) -> int64 (B,) next tokens, on the device without a host sync.

    temperature <= 0: argmax. Otherwise a draw from softmax(logits / temperature), restricted to the
    top_k largest logits when top_k is given, by the exponential race: argmax_i p_i / E_i with
    E_i ~ Exp(1) i.i.d. picks i with probability p_i (no multinomial, capturable in a CUDA graph)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, -1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race.clamp_min(torch.finfo(race.dtype).tiny)).argmax(-1)


def fused_step_supported(model, cache) -> bool:
    """The fused step needs the Triton decode (every layer's backend resolves to Triton: CUDA, or the
    interpreter with backend="triton"), no index RMSNorm / RoPE (MiniMax-M3 option) and no per-block
    fp8 index scales."""
    if cache.fp8_index and cache.index_scale_mode == "block":
        return False
    w = model.embed.weight
    for layer in model.layers:
        c = layer.attn.config
        if c.index_norm_rope or resolve_backend(c.backend, [w]) != "triton":
            return False
    return True


class FusedDecodeStep:
    """The per-token step of ``MSAForCausalLM.decode_step`` with few launches (built once per generation).

    Per layer: one GEMM for the concatenated q / k / v / q_idx / k_idx projections, one kernel for RoPE +
    the cache append + the length update (``rope_append``), the decode attention (2-3 kernels), o_proj,
    one kernel for the residual add + the MLP's RMSNorm, the MLP (two GEMMs around one silu * up kernel),
    one kernel for the residual add + the next RMSNorm. RoPE reads cos / sin from per-position tables computed once (the
    same float64-derived values as ``rotary_cos_sin``). Same math as the module path; roundings may
    differ in the last bit (fused multiply-adds, reduction order).

    __call__(input_ids int64 (B, t)) -> fp32 logits (B, vocab) of each sequence's last new token.
    """

    def __init__(self, model, cache):
        from ..ops.decode.step import add_rmsnorm, rope_append, silu_mul
        self._add_rmsnorm, self._rope_append, self._silu_mul = add_rmsnorm, rope_append, silu_mul
        self.model, self.cache = model, cache
        dev = model.embed.weight.device
        self.weights, self.tables = [], {}
        for layer in model.layers:
            a, c = layer.attn, layer.attn.config
            ws = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
            if c.use_index:
                ws += [a.q_idx_proj.weight, a.k_idx_proj.weight]
            self.weights.append(torch.cat([w.detach() for w in ws]).contiguous())
            key = (c.rotary_dim, c.rope_theta)
            if key not in self.tables:
                pos = torch.arange(cache.max_seq_len, device=dev)
                cos, sin = rotary_cos_sin(pos, c.rotary_dim, c.rope_theta, model.embed.weight.dtype)
                self.tables[key] = (cos.contiguous(), sin.contiguous())

    def _norm(self, x, h, norm):
        return self._add_rmsnorm(x, h, norm.weight, norm.eps, norm.unit_offset)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        m, cache = self.model, self.cache
        x = m.embed(input_ids)
        bsz, t, _ = x.shape
        x, y = self._norm(x, None, m.layers[0].attn_norm)
        for i, layer in enumerate(m.layers):
            a, c = layer.attn, layer.attn.config
            proj = F.linear(y, self.weights[i])
            q = torch.empty(bsz, t, c.num_heads, c.head_dim, dtype=x.dtype, device=x.device)
            qi = torch.empty(bsz, t, c.num_kv_heads, c.index_dim, dtype=x.dtype, device=x.device) if c.use_index else None
            cos, sin = self.tables[(c.rotary_dim, c.rope_theta)]
            self._rope_append(proj, cache, i, q, qi, cos, sin, num_heads=c.num_heads, head_dim=c.head_dim,
                              index_dim=c.index_dim if c.use_index else None)
            o, _ = decode_attention_step(q, qi, cache, i, block_size=c.block_size, topk=c.topk_blocks,
                                         init_blocks=c.init_blocks, local_blocks=c.local_blocks,
                                         scale=c.head_dim ** -0.5, index_scale=c.index_dim ** -0.5,
                                         dense=a.mode != "sparse", backend=c.backend)
            x, y = self._norm(x, a.o_proj(o.reshape(bsz, t, c.num_heads * c.head_dim)), layer.mlp_norm)
            nxt = m.layers[i + 1].attn_norm if i + 1 < len(m.layers) else m.norm
            h = layer.mlp.down(self._silu_mul(layer.mlp.gate_up(y)))
            x, y = self._norm(x, h, nxt)
        return m.lm_head(y[:, -1]).float()


def _as_prompt_list(prompts) -> List[torch.Tensor]:
    if isinstance(prompts, torch.Tensor):
        check(prompts.dim() == 2 and prompts.shape[0] > 0 and prompts.shape[1] > 0,
              f"prompts must be a non-empty (B, T) integer tensor or a list of 1-D integer tensors, "
              f"got shape {tuple(prompts.shape)}")
        return list(prompts)
    check(isinstance(prompts, (list, tuple)) and len(prompts) > 0,
          f"prompts must be a (B, T) integer tensor or a non-empty list of 1-D integer tensors, got {type(prompts).__name__}")
    return list(prompts)


class GenerationSession:
    """One generation of ``model`` from ``prompts`` (validated here, once).

    Args:
        model: an ``MSAForCausalLM`` (all floating parameters of one dtype: the cache's).
        prompts: int (B, T) tensor or a list of B 1-D int tensors of any lengths >= 1, token ids in
            [0, vocab_size); any device (copied to the model's).
        max_new_tokens: tokens to generate per sequence (>= 1).
        temperature: 0 = greedy; > 0 samples (``pick_tokens``).
        top_k: None or an int in [1, vocab_size] (sampling only).
        generator: optional torch.Generator on the model's device for sampling.
        cuda_graph: capture the per-token step in a CUDA graph when the model is on CUDA (ignored on CPU).
        fused_step: None (default) = the fused step (``FusedDecodeStep``) wherever it is supported
            (``fused_step_supported``), else ``model.decode_step``; False = always ``model.decode_step``.

    Use: ``prefill()`` then ``step()`` max_new_tokens - 1 times, then ``tokens()``; or ``run()``.
    ``out`` int64 (B, max_new_tokens) holds the tokens generated so far; ``logits`` fp32 (B, vocab) the
    logits the latest step (or the prefill) picked from.
    """

    def __init__(self, model, prompts: Union[torch.Tensor, Sequence[torch.Tensor]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, cuda_graph: bool = True,
                 fused_step: Optional[bool] = None):
        prompts = _as_prompt_list(prompts)
        vocab = model.config.vocab_size
        for i, p in enumerate(prompts):
            check(isinstance(p, torch.Tensor) and p.dim() == 1 and p.numel() > 0,
                  f"prompts[{i}] must be a non-empty 1-D integer tensor, got "
                  f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
            check(not p.is_floating_point() and not p.is_complex() and p.dtype != torch.bool,
                  f"prompts[{i}] must hold integer token ids, got {p.dtype}")
        check(isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens >= 1,
              f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
        check(isinstance(temperature, (int, float)) and temperature >= 0,
              f"temperature must be a float >= 0, got {temperature!r}")
        check(top_k is None or (isinstance(top_k, int) and 1 <= top_k <= vocab),
              f"top_k must be None or an int in [1, vocab_size={vocab}], got {top_k!r}")
        check(isinstance(cuda_graph, bool), f"cuda_graph must be a bool, got {cuda_graph!r}")
        check(fused_step in (None, False, True), f"fused_step must be None or a bool, got {fused_step!r}")
        dev = model.embed.weight.device
        dtype = model.embed.weight.dtype
        check(generator is None or (isinstance(generator, torch.Generator) and generator.device.type == dev.type),
              f"generator must be None or a torch.Generator on the model's device ({dev})")
        bad = sorted({str(p.dtype) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype})
        check(not bad, f"every floating parameter must have the embedding's dtype {dtype} (the cache dtype); "
              f"found {bad}: call model.to({dtype}) first")
        ids = torch.cat([p.detach().reshape(-1) for p in prompts]).to("cpu", torch.int64)
        check(int(ids.min()) >= 0 and int(ids.max()) < vocab,
              f"prompt token ids must be in [0, vocab_size={vocab}), got [{int(ids.min())}, {int(ids.max())}]")
        for layer in model.layers:
            a = layer.attn.config
            if resolve_backend(a.backend, [model.embed.weight]) == "triton":
                check(a.block_size >= 16 and a.block_size & (a.block_size - 1) == 0,
                      f"block_size must be a power of two >= 16 for the Triton decode kernels, got {a.block_size}")

        self.model, self.device = model, dev
        self.max_new_tokens = max_new_tokens
        self.temperature, self.top_k, self.generator = float(temperature), top_k, generator
        self.use_graph = cuda_graph and dev.type == "cuda"
        self.lens = [p.numel() for p in prompts]
        self.batch_size = len(prompts)
        self.ids = ids.to(dev)
        self.cache = model.new_cache(self.batch_size, max(self.lens) + max_new_tokens)
        self.out = torch.zeros(self.batch_size, max_new_tokens, dtype=torch.int64, device=dev)
        self.tok = torch.zeros(self.batch_size, 1, dtype=torch.int64, device=dev)  # the next step's input
        self.col = torch.zeros(1, dtype=torch.int64, device=dev)  # the column of ``out`` the next step writes
        supported = fused_step_supported(model, self.cache)
        check(fused_step is not True or supported,
              "fused_step=True needs the Triton decode on every layer, index_norm_rope=False and per-token "
              "(or no) fp8 index scales")
        self.fused = FusedDecodeStep(model, self.cache) if (fused_step is not False and supported) else None
        self.logits: Optional[torch.Tensor] = None
        self.graph = None
        self.steps = 0  # steps run (host counter)

    # -------------------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor) -> None:
        nxt = pick_tokens(logits, self.temperature, self.top_k, self.generator).view(self.batch_size, 1)
        self.out.index_copy_(1, self.col, nxt)
        self.tok.copy_(nxt)
        self.col.add_(1)

    def prefill(self) -> None:
        """Packed prefill of every prompt into the cache and the first token (from the last prompt
        position of each sequence; only those B rows go through the lm head)."""
        check(self.steps == 0 and self.logits is None, "prefill() runs once, first")
        m = self.model
        cu = torch.zeros(self.batch_size + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(self.lens), 0)
        cu = cu.to(self.device)
        x = m.embed(self.ids.view(1, -1))
        for i, layer in enumerate(m.layers):
            x, _ = layer(x, cu_seqlens=cu, cache=self.cache, layer_idx=i, compute_kl=False)
        last = x[0, (cu[1:] - 1).to(torch.int64)]
        self.logits = m.lm_head(m.norm(last)).float()
        self._pick(self.logits)

    def _step_eager(self) -> None:
        self.logits = self.fused(self.tok) if self.fused is not None else self.model.decode_step(self.tok, self.cache)
        self._pick(self.logits)

    def _capture(self) -> None:
        """Warm up (steps rolled back: lengths, input token, output column), then capture one step."""
        c = self.cache
        saved_lens = [x.clone() for x in c.lengths_dev]
        saved_tok, saved_col = self.tok.clone(), self.col.clone()
        rng = self.generator or torch.cuda.default_generators[self.device.index or 0]
        saved_rng = rng.get_state() if self.temperature > 0 else None
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step_eager()
                for x, s in zip(c.lengths_dev, saved_lens):
                    x.copy_(s)
                self.tok.copy_(saved_tok)
                self.col.copy_(saved_col)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if saved_rng is not None:
            torch.cuda.synchronize(self.device)
            rng.set_state(saved_rng)
        graph = torch.cuda.CUDAGraph()
        if self.temperature > 0 and self.generator is not None:
            graph.register_generator_state(self.generator)
        with torch.cuda.graph(graph):
            self._step_eager()
        self.graph = graph

    def step(self) -> None:
        """One new token for every sequence (graph replay, or the same step eagerly). No host sync."""
        check(self.logits is not None, "call prefill() before step()")
        check(self.steps + 1 < self.max_new_tokens,
              f"max_new_tokens={self.max_new_tokens} tokens are generated already")
        if self.use_graph:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self._step_eager()
        self.steps += 1

    def tokens(self) -> List[torch.Tensor]:
        """The generated tokens: B int64 tensors of the steps run so far + 1 (syncs the host lengths)."""
        self.cache.sync_lengths()
        return list(self.out[:, : self.steps + 1])

    def run(self) -> List[torch.Tensor]:
        """prefill, max_new_tokens - 1 steps, the tokens; then drops the graph and the cache's plans
        (a plan refers to its cache: without this the cache's memory waits for Python's cycle collector)."""
        self.prefill()
        for _ in range(self.max_new_tokens - 1):
            self.step()
        out = self.tokens()
        self.close()
        return out

    def close(self) -> None:
        """Release the graph and the decode plans (the session cannot step afterwards)."""
        self.graph = None
        self.fused = None
        self.cache.plans.clear()
        self.logits = None
