"""Helpers shared by the MSA ops: Triton launch helpers and the reverse index of a block selection
(``SelectionPlan``: the per-selection metadata the main branch's forward, backward and the KL share).
Argument checks and the packed-sequence bookkeeping live in ``msa.ops.common``."""
