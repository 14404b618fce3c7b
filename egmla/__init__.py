"""egmla: Embedding-Gated Multi-head Latent Attention (arXiv 2509.16686) and its relatives.

The names below load on first use (PEP 562), so `import egmla.cli` does not import torch: the `egmla`
command must set OpenMP's wait policy before torch loads its threads (see egmla/cli.py)."""
import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "KVCache": "egmla.attention", "allocate_cache": "egmla.attention", "decode_paths": "egmla.attention",
    "PRESETS": "egmla.config", "ModelConfig": "egmla.config", "preset": "egmla.config",
    "Transformer": "egmla.model", "count_params": "egmla.model",
}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'egmla' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
