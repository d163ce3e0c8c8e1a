"""T6 / T6-KVonly models, checkpoint loading and tokenizers.

`T6` is imported lazily: the API process loads tokenizers and chat templates from here
without loading torch (tests/test_layering.py checks it)."""

__all__ = ["T6"]


def __getattr__(name: str):
    if name == "T6":
        from tpaserve.models.t6 import T6
        return T6
    raise AttributeError(f"module 'tpaserve.models' has no attribute {name!r}")
