"""moeshard's Python API: `moeshard.encode`, `moeshard.score`, `moeshard.shard` and `moeshard.Pool`.

The code lives in the `moeshard_cli` package (moeshard_cli/api.py); this name is what users import.
"""

from moeshard_cli import __version__
from moeshard_cli.api import Pool, encode, score, shard
from moeshard_cli.errors import UserError

__all__ = ["Pool", "UserError", "__version__", "encode", "score", "shard"]
