"""32 concurrent greedy requests (more than --max-num-seqs, so some wait) give exactly what
the same requests give one at a time: batching, chunked prefill and queueing change
nothing a client sees."""
from __future__ import annotations

import asyncio

from tests.api.conftest import MODEL_NAME

WORDS = "the quick brown fox jumps over lazy dog hello world tensor product attention".split()


def prompts() -> list[str]:
    # different lengths and contents, so the batch mixes prefill chunks and decode rows
    return [" ".join(WORDS[(i * 5) % len(WORDS):] + WORDS[:i % 7]) for i in range(32)]


def test_32_concurrent_greedy_equal_sequential(server):
    kw = dict(model=MODEL_NAME, temperature=0, extra_body={"ignore_eos": True})
    sync = server.client()
    sequential = [sync.completions.create(prompt=p, max_tokens=8 + i % 9, **kw).choices[0].text
                  for i, p in enumerate(prompts())]

    async def concurrent() -> list[str]:
        c = server.async_client()
        try:
            async def one(i: int, p: str) -> str:
                if i % 2:                               # half of them stream
                    text = ""
                    async for ch in await c.completions.create(
                            prompt=p, max_tokens=8 + i % 9, stream=True, **kw):
                        text += ch.choices[0].text if ch.choices else ""
                    return text
                r = await c.completions.create(prompt=p, max_tokens=8 + i % 9, **kw)
                return r.choices[0].text
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts())))
        finally:
            await c.close()

    assert asyncio.run(concurrent()) == sequential
    assert server.metric("tpaserve:factor_cache_blocks_used") == 0
