"""moeshard: dropless MoE encoder inference by expert sharding (MoEShard)."""

__version__ = "0.1.0"
