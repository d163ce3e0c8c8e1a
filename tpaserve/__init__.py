"""tpaserve: a serving engine for Tensor Product Attention (T6) language models.

    from tpaserve import LLM, SamplingParams
    llm = LLM("path/to/checkpoint")           # LLM() serves the bundled demo model
    out = llm.generate(["Once upon a time"], SamplingParams(max_tokens=32))
"""
__version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "EngineArgs", "SamplingParams", "StructuredOutputsParams",
           "__version__"]


def __getattr__(name: str):
    # Lazy: `import tpaserve.kernels` on a GPU box must not pull in the engine, and the API
    # process never loads torch.
    if name == "LLM":
        from tpaserve.frontend.llm import LLM
        return LLM
    if name == "LLMEngine":
        from tpaserve.frontend.llm_engine import LLMEngine
        return LLMEngine
    if name == "EngineArgs":
        from tpaserve.args import EngineArgs
        return EngineArgs
    if name == "SamplingParams":
        from tpaserve.sampling_params import SamplingParams
        return SamplingParams
    if name == "StructuredOutputsParams":
        from tpaserve.structured_outputs import StructuredOutputsParams
        return StructuredOutputsParams
    raise AttributeError(f"module 'tpaserve' has no attribute {name!r}")
