"""The GPU suite's pure parts (the suite itself runs on the H200)."""
from bench import run_gpu_suite as suite
from bench.metrics import batch_row


def test_summary_table_lists_every_row_and_the_verify_line():
    results = dict(
        baselines=[batch_row("hf-generate", 64, 512, 256, 0.2, 17.0)],
        sweep=[dict(batch_row("tpaserve", c, 512, 256, 0.05, 3.0), label="tpaserve")
               for c in (1, 4)],
        long_context=[batch_row("tpaserve", 4, 32768, 128, 2.0, 6.0)],
        verify=dict(max_running=196, requested=196, context=4096, server_num_blocks=50382,
                    completed=196, failed=0),
        capacity=dict(cache_bytes=80 * 2**30, rows=[dict(context=4096, TPA=984, **{
            "MHA-16": 213}, tpa_over_mha=4.62)]))
    text = suite.summary_table(results)
    assert len(text.splitlines()) == 1 + 4 + 2
    assert "tpaserve 32768/128" in text and "hf-generate 512/256" in text
    assert "196 of 196" in text and "TPA 984, MHA-16 213" in text


def test_serve_args_are_token_id_runs():
    args = suite.serve_args("http://h:1", 1000, input_len=512, concurrency="1,4")
    assert args[args.index("--vocab-size") + 1] == 1000 and "--token-ids" in args
    assert args[-4:] == ["--input-len", 512, "--concurrency", "1,4"]
