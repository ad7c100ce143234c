"""headlens: find and score attention-head roles (induction, retrieval, successor, safety,
copy suppression) in pretrained transformers, with causal evidence, into one per-head catalogue."""
__version__ = "0.1.0"

from .data import data_path
from .errors import HeadlensError
from .models import HeadModel, ModelInfo, load_model

__all__ = ["__version__", "data_path", "HeadlensError", "HeadModel", "ModelInfo", "load_model"]
