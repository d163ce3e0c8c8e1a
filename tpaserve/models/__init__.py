"""The paper's model family (T6, T6-KVonly; MHA/GQA/MQA; MLA), checkpoint loading and
tokenizers.

The models are imported lazily: the API process loads tokenizers and chat templates from
here without loading torch (tests/test_layering.py checks it)."""

__all__ = ["T6", "DenseLM", "MLA"]
_WHERE = {"T6": "tpaserve.models.t6", "DenseLM": "tpaserve.models.dense",
          "MLA": "tpaserve.models.mla"}


def __getattr__(name: str):
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'tpaserve.models' has no attribute {name!r}")
