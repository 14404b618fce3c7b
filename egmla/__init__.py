"""egmla: Embedding-Gated Multi-head Latent Attention (arXiv 2509.16686) and its relatives."""
from egmla.attention import KVCache, allocate_cache, decode_paths
from egmla.config import PRESETS, ModelConfig, preset
from egmla.model import Transformer, count_params

__version__ = "0.1.0"
__all__ = ["KVCache", "ModelConfig", "PRESETS", "Transformer", "allocate_cache", "count_params",
           "decode_paths", "preset", "__version__"]
