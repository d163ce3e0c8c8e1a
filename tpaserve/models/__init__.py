"""T6 / T6-KVonly models, checkpoint loading and tokenizers."""
from tpaserve.models.t6 import T6

__all__ = ["T6"]
