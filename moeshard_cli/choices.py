"""The values a choice option may take, as `Literal` types: the one place that lists them.

torch-free, so the command line can offer and check them (click's Choice, shell completion)
before anything heavy is imported; the modules that act on a value import its tuple from here.
"""

from __future__ import annotations

from typing import Literal, get_args

Pooling = Literal["mean", "last", "none"]
Device = Literal["auto", "cpu", "cuda"]
ExpertBackend = Literal["auto", "grouped_mm", "loop", "megablocks"]
Attention = Literal["eager", "fused"]
Router = Literal["model", "skewed"]
Dtype = Literal["float32", "bfloat16", "float16"]
InputFormat = Literal["txt", "jsonl", "csv", "tsv", "parquet"]

POOLINGS: tuple[str, ...] = get_args(Pooling)
DEVICES: tuple[str, ...] = get_args(Device)
BACKENDS: tuple[str, ...] = get_args(ExpertBackend)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
ROUTERS: tuple[str, ...] = get_args(Router)
DTYPE_NAMES: tuple[str, ...] = get_args(Dtype)
INPUT_FORMATS: tuple[str, ...] = get_args(InputFormat)

# The built-in models (families/*.py define them; a unit test keeps this list equal to theirs),
# offered by shell completion wherever a model name goes.
BUILTIN_MODELS = ("tiny-switch", "switch-base-8", "switch-base-16", "switch-base-32", "switch-base-64",
                  "switch-base-128", "switch-base-256", "tiny-qwen3-moe", "qwen3-moe-mid", "tiny-olmoe", "olmoe-mid",
                  "tiny-mixtral", "mixtral-mid", "tiny-gpt-oss", "gpt-oss-mid", "tiny-qwen2-moe", "tiny-deepseek-v3",
                  "deepseek-v3-mid", "tiny-deepseek-v2", "tiny-phimoe", "tiny-granite-moe", "tiny-granite-moe-shared",
                  "tiny-granite-moe-swa", "tiny-granite-moe-hybrid", "tiny-glm4-moe", "tiny-ernie4-5-moe", "tiny-hunyuan-v1-moe",
                  "tiny-minimax", "tiny-cohere2-moe", "tiny-dots1", "tiny-exaone-moe", "tiny-solar-open", "tiny-flex-olmo",
                  "tiny-minimax-m2", "tiny-mellum", "tiny-afmoe", "tiny-kolibri1", "tiny-laguna", "tiny-mimo-v2-flash", "tiny-hy-v3")


def complete_model(incomplete: str) -> list[str]:
    """Shell completion of a model argument: the built-in names (hub ids and paths are the user's)."""
    return [name for name in BUILTIN_MODELS if name.startswith(incomplete)]
