"""tpaserve: a serving engine for Tensor Product Attention (T6) language models.

    from tpaserve import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))
"""
__version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "SamplingParams", "__version__"]


def __getattr__(name: str):
    # Lazy: `import tpaserve.kernels` on a GPU box must not pull in the engine.
    if name in ("LLM", "LLMEngine"):
        from tpaserve.engine import llm_engine
        return getattr(llm_engine, name)
    if name == "SamplingParams":
        from tpaserve.sampling_params import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'tpaserve' has no attribute {name!r}")
