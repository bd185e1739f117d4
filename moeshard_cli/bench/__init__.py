"""`moeshard bench`: the paper's experiments against DeepSpeed-MoE and expert parallelism.

command.py validates and launches; worker.py builds one model shell (model.build_shell) and
runs every system (systems.py: one dispatch each, deepspeed_moe.py for the real DeepSpeed
layer) on the same inputs and router assignment, interleaved; weights.py holds the experts
once in shared memory; report.py turns the samples into tables, JSON and a plot.
"""
