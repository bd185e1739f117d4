"""The sharded MoE layer: routing, token exchange and grouped expert compute, kept apart."""
