"""`moeshard bench`: the paper's experiments against DeepSpeed-MoE and expert parallelism."""
