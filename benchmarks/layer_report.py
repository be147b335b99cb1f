"""The summary `python -m benchmarks layer` prints from its rows: markdown tables of hf-moe against the peers (block
and experts alone), CUDA graphs, Liger-Kernel, quack's weight gradients and decode against the HBM floor."""

from __future__ import annotations

from .timing import ratio as factor


def _cases(summary: list[tuple[str, float | None, dict]], name: str) -> list[tuple[str, dict]]:
    """The training cases (key, results) that measured implementation `name`."""
    return [(key, res) for key, dense, res in summary if dense is not None and name in res]


def print_summary(summary: list[tuple[str, float | None, dict]], cpu: bool) -> None:
    """Markdown tables: one line per case with hf-moe, the peers and the ratios. `summary` holds (case,
    dense-equivalent TFLOP/s, results by implementation) for the training cases and (case, None, row) for decode."""
    key_ms = "fwdbwd_min_ms" if cpu else "fwdbwd_ms"
    fmt = ".3f" if cpu else ".0f"

    def tf(r: dict, k: str) -> str:
        return f"{r[k]:{fmt}}" if k in r else "-"

    def ratio(peer: dict, hf: dict) -> str:
        return factor(peer[key_ms], hf[key_ms]) if key_ms in peer and key_ms in hf else "-"

    unit = "TFLOP/s" if not cpu else "TFLOP/s (CPU)"
    print(f"\n| case | dense-equiv {unit} | hf-moe block fwd / fwd+bwd | peer grouped_mm block fwd / fwd+bwd | "
          "peer eager block fwd+bwd | block ratio vs grouped_mm / vs eager (fwd+bwd) | experts only: hf-moe / peer "
          "grouped_mm fwd+bwd | experts ratio | hf-moe experts on torch's GEMMs fwd+bwd | activations KB/token "
          "hf / peer | peak GB hf / peer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, dense, res in summary:
        if dense is None:
            continue
        hf, gm, ea = res["hf-moe"], res.get("peer_grouped_mm", {}), res.get("peer_eager", {})
        ehf, egm = res["experts_hf-moe"], res["experts_peer_grouped_mm"]
        etg = res.get("experts_hf-moe_torch_gemms", {})
        mem = lambda r, k, f: f"{r[k]:{f}}" if k in r else "-"  # noqa: E731
        print(f"| {key} | {dense:{fmt}} | {tf(hf, 'fwd_tflops')} / {tf(hf, 'fwdbwd_tflops')} | "
              f"{tf(gm, 'fwd_tflops')} / {tf(gm, 'fwdbwd_tflops')} | {tf(ea, 'fwdbwd_tflops')} | "
              f"{ratio(gm, hf)} / {ratio(ea, hf)} | {tf(ehf, 'fwdbwd_tflops')} / {tf(egm, 'fwdbwd_tflops')} | "
              f"{ratio(egm, ehf)} | {tf(etg, 'fwdbwd_tflops')} | {mem(hf, 'act_kb_per_token', '.1f')} / {mem(gm, 'act_kb_per_token', '.1f')} | "
              f"{mem(hf, 'peak_fwdbwd_gb', '.2f')} / {mem(gm, 'peak_fwdbwd_gb', '.2f')} |")
    graphed_rows = _cases(summary, "hf-moe_graphed")
    if graphed_rows:
        print("\n| case | hf-moe block fwd+bwd, eager | in CUDA graphs (`capture_moe_cuda_graphs`) | graphed / eager | "
              "graphed vs peer grouped_mm |")
        print("| --- | --- | --- | --- | --- |")
        for key, res in graphed_rows:
            hf, gr, gm = res["hf-moe"], res["hf-moe_graphed"], res.get("peer_grouped_mm", {})
            if "error" in gr:
                print(f"| {key} | {tf(hf, 'fwdbwd_tflops')} | {gr['error'][:80]} | - | - |")
                continue
            print(f"| {key} | {tf(hf, 'fwdbwd_tflops')} | {tf(gr, 'fwdbwd_tflops')} | {ratio(hf, gr)} | "
                  f"{ratio(gm, gr)} |")
    liger_rows = _cases(summary, "liger")
    if liger_rows:
        print("\n| case | hf-moe block fwd / fwd+bwd | liger block fwd / fwd+bwd | block ratio | hf-moe experts fwd / "
              "fwd+bwd | liger experts fwd / fwd+bwd | experts ratio | activations KB/token hf / liger | "
              "peak GB hf / liger |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for key, res in liger_rows:
            hf, lg, ehf, elg = res["hf-moe"], res["liger"], res["experts_hf-moe"], res["experts_liger"]
            print(f"| {key} | {tf(hf, 'fwd_tflops')} / {tf(hf, 'fwdbwd_tflops')} | {tf(lg, 'fwd_tflops')} / "
                  f"{tf(lg, 'fwdbwd_tflops')} | {ratio(lg, hf)} | {tf(ehf, 'fwd_tflops')} / {tf(ehf, 'fwdbwd_tflops')} | "
                  f"{tf(elg, 'fwd_tflops')} / {tf(elg, 'fwdbwd_tflops')} | {ratio(elg, ehf)} | "
                  f"{hf.get('act_kb_per_token', 0):.1f} / {lg.get('act_kb_per_token', 0):.1f} | "
                  f"{hf.get('peak_fwdbwd_gb', 0):.2f} / {lg.get('peak_fwdbwd_gb', 0):.2f} |")
    b2b_rows = [(key, res) for key, dense, res in summary if dense is not None and "fwdbwd_b2b_tflops" in res["hf-moe"]]
    if b2b_rows:
        print("\n| case | fwd+bwd TFLOP/s from an idle GPU / back to back: hf-moe | peer grouped_mm | "
              "hf-moe without quack |")
        print("| --- | --- | --- | --- |")
        for key, res in b2b_rows:
            cells = [f"{tf(r, 'fwdbwd_tflops')} / {tf(r, 'fwdbwd_b2b_tflops')}" if r else "-"
                     for r in (res["hf-moe"], res.get("peer_grouped_mm"), res.get("hf-moe_without_quack"))]
            print(f"| {key} | {' | '.join(cells)} |")
    sort_rows = _cases(summary, "hf-moe_torch_sort")
    if sort_rows:
        print("\n| case | hf-moe block TFLOP/s fwd / fwd+bwd / fwd+bwd back to back: counting sort | torch's sort | "
              "fwd+bwd ratio |")
        print("| --- | --- | --- | --- |")
        for key, res in sort_rows:
            cells = [" / ".join(tf(r, k) for k in ("fwd_tflops", "fwdbwd_tflops", "fwdbwd_b2b_tflops"))
                     for r in (res["hf-moe"], res["hf-moe_torch_sort"])]
            print(f"| {key} | {cells[0]} | {cells[1]} | {ratio(res['hf-moe_torch_sort'], res['hf-moe'])} |")
    quack_rows = _cases(summary, "hf-moe_without_quack")
    if quack_rows:
        print("\n| case | hf-moe block fwd+bwd TFLOP/s, quack weight gradients / torch's | ratio |")
        print("| --- | --- | --- |")
        for key, res in quack_rows:
            hf, torch_wg = res["hf-moe"], res["hf-moe_without_quack"]
            print(f"| {key} | {tf(hf, 'fwdbwd_tflops')} / {tf(torch_wg, 'fwdbwd_tflops')} | {ratio(torch_wg, hf)} |")
    decode_rows = [r for key, dense, r in summary if dense is None]
    if decode_rows:
        print("\n| decode (T=64, fwd) | eager ms | × floor | CUDA graph ms | × floor | floor ms |")
        print("| --- | --- | --- | --- | --- | --- |")
        for r in (r for r in decode_rows if "ms" in r):
            g = f"{r['graph_ms']:.3f} | {r['graph_x_floor']:.2f}" if "graph_ms" in r else f"{r.get('graph_error', '-')} | -"
            print(f"| {r['what']} | {r['ms']:.3f} | {r['x_floor']:.2f} | {g} | {r['floor_ms']:.3f} |")
    if cpu:
        print("\nCPU: TFLOP/s from medians; ratios from the fastest repetition (noise on a shared machine only adds "
              "time).")
