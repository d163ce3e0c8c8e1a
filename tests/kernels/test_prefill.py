"""Paged extend/prefill kernel vs reference.paged_attention_ref: whole prompts (n == L),
chunks after a cached prefix (n < L), decode rows mixed into the batch, h 47 / 5,
ranks 1/2/6, d_h 64/48/32/16, block sizes 1/8/16, shuffled block tables."""
import pytest
import torch

from tests.kernels.paged_case import TOL, make_case, rel_err
from tpaserve.kernels.prefill import PrefillConfig, prefill_attention

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _prefill(c, config=None):
    out = torch.full_like(c.q, float("nan"))
    return prefill_attention(c.q, *c.caches(), *c.metadata(), c.max_query_len, out=out,
                             config=config)


CASES = [  # (lens, n_queries, h, d_h, R_K, R_V, block_size, dtype)
    ([1, 17, 40], [1, 17, 40], 5, 16, 2, 2, 8, torch.float32),           # whole prompts
    ([33, 50], [5, 20], 47, 64, 2, 2, 16, torch.float32),                # chunk after prefix
    ([1, 9, 30], [1, 1, 12], 5, 32, 1, 6, 1, torch.float16),             # decode rows mixed in
    ([16, 15], [3, 15], 47, 48, 6, 1, 16, torch.float16),
]


@pytest.mark.parametrize("lens,n_q,h,d_h,r_k,r_v,bs,dtype", CASES)
def test_prefill_matches_reference(lens, n_q, h, d_h, r_k, r_v, bs, dtype):
    c = make_case(lens, n_q, h, d_h, r_k, r_v, bs, dtype, DEV, seed=sum(lens))
    err = rel_err(_prefill(c), c.reference())
    assert err < TOL[dtype], f"relative error {err:.2e}"


def test_prefill_batched_equals_per_request():
    lens, n_q = [20, 35], [20, 6]
    c = make_case(lens, n_q, 5, 16, 2, 2, 8, torch.float32, DEV, seed=4)
    got = _prefill(c)
    qsl = c.query_start_loc.tolist()
    for i in range(2):
        rows = slice(qsl[i], qsl[i + 1])
        one = prefill_attention(c.q[rows], *c.caches(), c.block_tables[i:i + 1],
                                c.seq_lens[i:i + 1],
                                torch.tensor([0, n_q[i]], dtype=torch.int32, device=DEV),
                                n_q[i])
        torch.testing.assert_close(got[rows], one, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("config", [None, PrefillConfig(64, 64, 4, 3), PrefillConfig(128, 64, 8, 3),
                                    PrefillConfig(64, 32, 4, 2)])
def test_prefill_t6_medium_bf16(config):
    # a 512-token chunk after a 3.5K prefix, a whole 1000-token prompt and two decode rows
    c = make_case([4096, 1000, 32768, 17], [512, 1000, 1, 1], 47, 64, 2, 2, 16,
                  torch.bfloat16, "cuda", seed=13)
    err = rel_err(_prefill(c, config=config), c.reference())
    assert err < TOL[torch.bfloat16], f"relative error {err:.2e}"


def test_work_list_grid_equals_the_full_grid():
    """A launch sized for a bigger step (padding items) over chunks, decode rows (skipped,
    left to the decode kernel) and a sequence without queries gives the chunks' rows."""
    from tpaserve.kernels.prefill import work_list, work_list_size
    n_q = [20, 1, 0, 33, 1, 5]
    c = make_case([40, 9, 12, 33, 50, 5], n_q, 5, 16, 2, 2, 8, torch.float32, DEV, seed=21)
    bm = 16                                            # the interpreter config's block_m
    size = work_list_size(128, 8, bm)
    items = work_list(n_q, bm, size)
    assert items[:10] == [0, 0, 0, 1, 3, 0, 3, 1, 3, 2] and items[10:12] == [5, 0]
    assert items[12:] == [-1] * (2 * size - 12)
    work = torch.tensor(items, dtype=torch.int32, device=DEV)
    want = c.reference()
    got = prefill_attention(c.q, *c.caches(), *c.metadata(), 64,
                            out=torch.full_like(c.q, float("nan")),
                            skip_single_rows=True, work=work)
    chunk_rows = torch.cat([torch.arange(0, 20), torch.arange(21, 54), torch.arange(55, 60)])
    assert rel_err(got[chunk_rows], want[chunk_rows]) < 1e-4
    assert torch.isnan(got[[20, 54]]).all()            # decode rows untouched
    from tpaserve.kernels import _validate
    with pytest.raises(_validate.KernelInputError, match="work items exceed"):
        work_list(n_q, bm, 3)
