"""The one place where algorithm choices and launch-configuration overrides of the Triton kernels live.

Every op reads its choices from ``msa.tuning.current()``; nothing else in the package reads the
environment. Change them for a block of code with the context manager (thread-local, nests)::

    import msa
    with msa.tuning.override(sparse_fwd_kernel="qo", sparse_bwd_dq="query"):
        out = model(x)

or process-wide with ``msa.tuning.set_default(...)``. Unknown field names, unknown launch-config keys
and values outside a field's choices raise ``ValueError``.

Benchmarking override: the environment variable ``MSA_TUNING`` (read once, at the first use) sets
process-wide defaults in the same syntax as the fields, separated by ``;``, e.g.
``MSA_TUNING="sparse_fwd_kernel=qo;sparse_fwd_kv_config=BLOCK_M=128,num_warps=8"``. It exists so
benchmark sweeps can run unchanged scripts; code should use ``override``.

Launch-config overrides (``*_config`` fields) are ``{name: int}`` dicts merged over the per-shape
defaults of the matching ``*_config()`` function (its docstring lists the keys); a key the kernel
does not have raises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Optional

ENV_VAR = "MSA_TUNING"

_CHOICES = {
    "sparse_fwd_kernel": ("auto", "kv", "qo", "tiled"),
    "sparse_fwd_partial_dtype": ("auto", "fp32"),
    "sparse_bwd_dq": ("auto", "kv", "query", "tiled"),
    "kl_dense_mode": ("auto", "flash-atomic", "flash"),
    "tile_order": ("consecutive", "greedy"),
    "work_order": ("auto", "items", "longest-first"),
}


@dataclass(frozen=True)
class Tuning:
    """Algorithm choices and launch overrides of the Triton kernels (defaults: the fastest measured).

    sparse_fwd_kernel: main-branch forward, "kv" (KV-outer + combine), "qo" (query-outer), "tiled"
        (tokens of one query block x G heads per MMA tile over the union of their blocks) or "auto"
        (query-tiled below 32K tokens, query-outer when KV-outer tiles would be poorly filled).
    sparse_fwd_partial_bytes: bytes of partial outputs per query chunk of the KV-outer forward and of
        the KV-outer dQ (None: min(16 GiB, 25% of free device memory), at least 256 MiB).
    sparse_fwd_partial_dtype: "auto" (the input dtype for bf16/fp16 inputs) or "fp32".
    sparse_bwd_dq: dQ algorithm, "kv" (KV-outer over the reverse index), "query" (query-outer),
        "tiled" (query-tiled over tile unions) or "auto" (tiled below 32K tokens, else kv).
    tile_order: which tokens of a query block share a tile of the query-tiled kernels (forward and
        dQ): "greedy" (grouped by selection, a smaller union of blocks per tile;
        ``msa.ops.utils.tile_union``) or "consecutive" (sequence order).
    kl_dense_mode: warmup KL, "flash-atomic" (one pass, fp32 atomics for dk_idx), "flash" (a second
        pass instead of atomics: deterministic) or "auto" ("flash" under
        ``torch.use_deterministic_algorithms(True)``, else "flash-atomic").
    kl_partial_bytes: bytes of per-entry KL partials per query chunk (None: 4 GiB).
    max_queries_per_item: hot-row split of the reverse index, the most (query, slot) entries one work
        item of a KV-outer kernel walks (None: topk * block_size / 2 below 32K tokens, else the spec's
        2 * topk * block_size; ``msa.ops.utils.reverse_index.hot_row_split``).
    work_order: launch order of the KV-outer kernels' work items, "items" (row order), "longest-first"
        (``msa.ops.utils.reverse_index.ReverseIndex``) or "auto" (longest first below 32K tokens).
    decode_bitonic / decode_pdl / decode_fp8_f16: decode index scan with a bitonic top-k network,
        programmatic dependent launch (sm_90+), fp8 index keys scored in fp16 (all on by default).
    debug_poison: fill uninitialised kernel buffers with NaN (tests: unwritten values show).
    *_config: launch-config overrides, see the module docstring.
    """

    sparse_fwd_kernel: str = "auto"
    sparse_fwd_partial_bytes: Optional[int] = None
    sparse_fwd_partial_dtype: str = "auto"
    sparse_bwd_dq: str = "auto"
    kl_dense_mode: str = "auto"
    tile_order: str = "greedy"
    kl_partial_bytes: Optional[int] = None
    max_queries_per_item: Optional[int] = None
    work_order: str = "auto"
    decode_bitonic: bool = True
    decode_pdl: bool = True
    decode_fp8_f16: bool = True
    debug_poison: bool = False
    sparse_fwd_kv_config: Mapping[str, int] = field(default_factory=dict)
    sparse_fwd_qo_config: Mapping[str, int] = field(default_factory=dict)
    sparse_fwd_tiled_config: Mapping[str, int] = field(default_factory=dict)
    sparse_fwd_combine_config: Mapping[str, int] = field(default_factory=dict)
    sparse_bwd_config: Mapping[str, int] = field(default_factory=dict)
    kl_kv_config: Mapping[str, int] = field(default_factory=dict)
    kl_dense_flash_config: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            val = getattr(self, name)
            if val not in choices:
                raise ValueError(f"tuning.{name} must be one of {choices}, got {val!r}")
        for name in ("sparse_fwd_partial_bytes", "kl_partial_bytes", "max_queries_per_item"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val <= 0):
                unit = "entries" if name == "max_queries_per_item" else "bytes"
                raise ValueError(f"tuning.{name} must be None or a positive int ({unit}), got {val!r}")
        for name in ("decode_bitonic", "decode_pdl", "decode_fp8_f16", "debug_poison"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"tuning.{name} must be a bool, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            if f.name.endswith("_config"):
                cfg = getattr(self, f.name)
                if not isinstance(cfg, Mapping) or not all(
                        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in cfg.items()):
                    raise ValueError(f"tuning.{f.name} must be a dict of {{name: int}}, got {cfg!r}")
                object.__setattr__(self, f.name, dict(cfg))


FIELDS = tuple(f.name for f in dataclasses.fields(Tuning))


def merge_launch_config(defaults: Dict[str, int], name: str) -> Dict[str, int]:
    """``defaults`` updated with the current ``tuning.<name>`` overrides; an unknown key raises."""
    overrides = getattr(current(), name)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"tuning.{name}: unknown key(s) {unknown}; this kernel's keys are {sorted(defaults)}")
    out = dict(defaults)
    out.update(overrides)
    return out


def _parse_value(name: str, text: str):
    text = text.strip()
    if name.endswith("_config"):
        out = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            key, sep, val = item.partition("=")
            try:
                out[key.strip()] = int(val)
            except ValueError:
                raise ValueError(f"{ENV_VAR}: {name}: {item!r} is not key=int") from None
            if not sep:
                raise ValueError(f"{ENV_VAR}: {name}: {item!r} is not key=int")
        return out
    default = next(f.default for f in dataclasses.fields(Tuning) if f.name == name)
    if isinstance(default, bool):
        if text not in ("0", "1", "true", "false"):
            raise ValueError(f"{ENV_VAR}: {name} must be 0/1/true/false, got {text!r}")
        return text in ("1", "true")
    if name.endswith("_bytes") or name == "max_queries_per_item":
        if text.lower() == "none":
            return None
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{ENV_VAR}: {name} must be an int, got {text!r}") from None
    return text


def parse(spec: str) -> Dict[str, object]:
    """``"a=1;b_config=X=1,Y=2"`` -> {"a": 1, "b_config": {"X": 1, "Y": 2}} (unknown fields raise)."""
    out: Dict[str, object] = {}
    for part in filter(None, (s.strip() for s in spec.split(";"))):
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or name not in FIELDS:
            raise ValueError(f"{ENV_VAR}: unknown or malformed entry {part!r}; fields are {list(FIELDS)}")
        out[name] = _parse_value(name, val)
    return out


def _check_names(overrides: Mapping[str, object]) -> None:
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown tuning field(s) {unknown}; fields are {list(FIELDS)}")


class _State(threading.local):
    stack: list


_state = _State()
_default: Optional[Tuning] = None


def _base() -> Tuning:
    global _default
    if _default is None:
        _default = Tuning(**parse(os.environ.get(ENV_VAR, "")))
    return _default


def current() -> Tuning:
    """The tuning in effect (innermost ``override`` of this thread, else the process default)."""
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else _base()


def set_default(**overrides) -> Tuning:
    """Change the process-wide default (fields not named keep their value); returns the new default."""
    global _default
    _check_names(overrides)
    _default = dataclasses.replace(_base(), **overrides)
    return _default


def reset_default() -> None:
    """Back to the built-in defaults plus ``MSA_TUNING`` (re-read)."""
    global _default
    _default = None


@contextlib.contextmanager
def override(**overrides) -> Iterator[Tuning]:
    """Use ``current()`` with ``overrides`` applied inside the ``with`` block (this thread only)."""
    _check_names(overrides)
    new = dataclasses.replace(current(), **overrides)
    stack = getattr(_state, "stack", None)
    if stack is None:
        stack = _state.stack = []
    stack.append(new)
    try:
        yield new
    finally:
        stack.pop()
