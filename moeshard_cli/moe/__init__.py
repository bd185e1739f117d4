"""The sharded MoE layer: routing, token exchange and grouped expert compute, kept apart.

routing.py (which experts, which weights) -> dispatch.py (the dispatch contract; MoEShard and
expert parallelism) over exchange.py (collectives and index arithmetic) and experts.py (grouped
GEMM backends) -> layer.py (moeshard's modules in transformers' models). timing.py times sections.

Shape suffixes, as in torchtitan's moe.py: `x_TD` is a [T, D] tensor.
  B  sequences of a batch          S  positions of a sequence (padded)
  T  this worker's real tokens     D  d_model
  E  experts                       F  d_ff, or a rank's slice of it (padded to 16 bytes)
  K  experts per token (top-k)     P  (token, expert) pairs, T x K
  H  an expert's input width: F, or 2F for gate and up side by side
  G  workers (ranks); in the bench, also the G rank slices an expert is held as
  L  a worker's own experts (expert parallelism)
  R  rows of a rank-major exchange buffer     N  rows of that buffer in expert-major order
  C  capacity per expert (DeepSpeed)
"""
