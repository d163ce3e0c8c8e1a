"""PNG plots of bench rows. matplotlib is imported here, lazily, and only when a plot is
asked for: it is not a tpaserve dependency, and nothing else in bench/ needs it."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise SystemExit("plotting needs matplotlib (pip install matplotlib); "
                         "the JSON results were written without it") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _by_label(rows: Sequence[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r.get("label") or r.get("model") or "run"].append(r)
    return groups


def plot_serving(rows: Sequence[dict], path: str) -> None:
    """Left: output tokens/s vs concurrency (rows sent all at once, one line per label,
    baselines included: their batch is their concurrency). Right: median and p99 TTFT and
    ITL vs request rate (rows with a finite rate). A panel without rows is left out."""
    by_conc = [r for r in rows if r.get("concurrency") and r.get("request_rate") in ("inf", None)]
    by_rate = [r for r in rows if isinstance(r.get("request_rate"), (int, float))]
    panels = [p for p, rs in (("conc", by_conc), ("rate", by_rate)) if rs]
    if not panels:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "conc":
            for label, rs in _by_label(by_conc).items():
                rs = sorted(rs, key=lambda r: r["concurrency"])
                ax.plot([r["concurrency"] for r in rs], [r["output_throughput"] for r in rs],
                        marker="o", label=label)
            ax.set(xscale="log", yscale="log",
                   xlabel="concurrency (requests in flight / batch)",
                   ylabel="output tokens/s", title="output throughput vs concurrency")
        else:
            for label, rs in _by_label(by_rate).items():
                rs = sorted(rs, key=lambda r: r["request_rate"])
                x = [r["request_rate"] for r in rs]
                for key, style in (("ttft", "-"), ("itl", "--")):
                    for stat, marker in (("median", "o"), ("p99", "^")):
                        y = [r[f"{stat}_{key}_ms"] for r in rs]
                        ax.plot(x, y, style, marker=marker,
                                label=f"{label} {stat} {key.upper()}".strip())
            ax.set(yscale="log", xlabel="request rate (req/s)", ylabel="ms",
                   title="TTFT and ITL vs request rate")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_capacity(contexts: Sequence[int], bytes_per_seq: dict[str, Sequence[int]],
                  path: str, budget: int | None = None) -> None:
    """Cache bytes per sequence vs context, one line per model (TPA, MHA, GQA-n)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for name, ys in bytes_per_seq.items():
        ax.plot(contexts, [y / 2**20 for y in ys], marker="o", label=name)
    if budget:
        ax.axhline(budget / 2**20, color="grey", linestyle=":", label="whole budget")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens)",
           ylabel="cache MiB per sequence", title="cache per sequence vs context")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_fleet(rows: Sequence[dict], path: str) -> None:
    """bench/fleet.py: prefix-cache hit rate (left) and median / p90 TTFT (right) vs
    replicas, one line per routing policy."""
    plt = _pyplot()
    fig, (hit, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
    by_routing: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_routing[r["routing"]].append(r)
    for routing, rs in by_routing.items():
        rs = sorted(rs, key=lambda r: r["replicas"])
        xs = [r["replicas"] for r in rs]
        line = hit.plot(xs, [r["hit_rate"] for r in rs], marker="o", label=routing)[0]
        ttft.plot(xs, [r["ttft_p50_ms"] for r in rs], marker="o", color=line.get_color(),
                  label=f"{routing} p50")
        ttft.plot(xs, [r["ttft_p90_ms"] for r in rs], marker="x", linestyle="--",
                  color=line.get_color(), label=f"{routing} p90")
    replicas = sorted({r["replicas"] for r in rows})
    hit.set(xlabel="replicas", ylabel="prefix-cache hit rate (tokens)", ylim=(0, 1),
            xticks=replicas, title="prompt tokens served from the prefix cache")
    ttft.set(xlabel="replicas", ylabel="TTFT (ms)", xticks=replicas, ylim=(0, None),
             title="time to first token, client side")
    for ax in (hit, ttft):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_family(result: dict, path: str) -> None:
    """bench/family.py's one figure: per twin, cache bytes per token, sequences that fit,
    decode time per layer, served output tok/s, TTFT and TPOT on the long prompts. T6 in a
    colour of its own; a twin not measured has no bar (its name stays on the axis)."""
    from bench.family import summary
    w, rows = result["workload"], summary(result)
    names = [r["name"] for r in rows]
    colours = ["tab:red" if n == "T6" else "tab:orange" if n.startswith("T6") else "tab:blue"
               for n in names]
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    x = list(range(len(names)))

    def bars(ax, keys_labels, title, ylabel, log=False):
        width = 0.8 / len(keys_labels)
        if all(r.get(key) is None for key, _ in keys_labels for r in rows):
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
            log = False
        for i, (key, label) in enumerate(keys_labels):
            ys = [r.get(key) for r in rows]
            xs = [xi + (i - (len(keys_labels) - 1) / 2) * width for xi in x]
            ax.bar([a for a, y in zip(xs, ys) if y is not None],
                   [y for y in ys if y is not None], width,
                   color=[c for c, y in zip(colours, ys) if y is not None],
                   alpha=1.0 if i == 0 else 0.55)
            if len(keys_labels) > 1:        # legend swatch in grey: the colour is the twin's
                ax.bar([0], [0], 0, color="grey", alpha=1.0 if i == 0 else 0.55, label=label)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set(title=title, ylabel=ylabel, yscale="log" if log else "linear")
        ax.grid(True, axis="y", alpha=0.3)
        if len(keys_labels) > 1:
            ax.legend(fontsize=8)

    ctx, gib = w["capacity_context"], w["cache_bytes"] / 2**30
    (b, c1), (_, c2) = w["decode_points"]
    bars(axes[0][0], [("bytes_per_token", "")], "cache bytes per token (all layers)", "bytes")
    engine = any(r["capacity_engine"] is not None for r in rows)
    bars(axes[0][1], [("capacity_engine" if engine else "capacity_arithmetic", "")],
         f"{ctx}-token sequences in {gib:g} GiB" + (" (engine)" if engine else " (arithmetic)"),
         "sequences")
    bars(axes[0][2], [(f"decode_{b}x{c1}_ms", f"{b} x {c1}"), (f"decode_{b}x{c2}_ms",
                                                              f"{b} x {c2}")],
         "decode attention, one layer", "ms", log=True)
    bars(axes[1][0], [(f"tok_s_c{c}", f"c={c}") for c in w["concurrency"]],
         f"served output tok/s (prompt {w['prompt']}, {w['output']} new)", "tokens/s")
    long = f"{w['long_requests']} x {w['long_prompt']}-token prompts"
    bars(axes[1][1], [("long_ttft_p50_ms", "")], f"TTFT p50, {long}", "ms")
    bars(axes[1][2], [("long_tpot_ms", "")], f"TPOT, {long}", "ms")
    title = "tpaserve: T6-medium and its medium twins, random weights"
    if result.get("smoke"):
        title += " (SMOKE RUN on CPU: tiny twins, the numbers mean nothing)"
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
