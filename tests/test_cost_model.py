"""The cost model of issue #23 (megatron_genlip/training/cost.py, benchmarks/cost_model.py): its counting is real.

* the GEMM FLOPs counted from a tiny model's forward + backward equal the credited formula's block and head terms
  (exactly, relative 1e-12: both are sums of 2 x M x N x K; the block term taken over every slot, padding included,
  which the blocks run on and MFU does not credit), and a matmul planted in the model's code shows up in the count;
* full recomputation executes exactly 4/3 of the block GEMM FLOPs, selective exactly 3/3;
* the FlexAttention tile counts equal a brute-force count of the dense mask (``masks.sdpa_mask``);
* the compiled-traffic island model on a hand-checkable toy graph.
No timing assertions.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megatron_genlip.config import ModelConfig, load_config
from megatron_genlip.training import cost
from megatron_genlip.model.attention import fa2_head_dim
from megatron_genlip.model.masks import sdpa_mask

RECIPE = Path(__file__).resolve().parents[1] / "examples/configs/stage1-So16.yaml"
TINY = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, text_embed_dim=64,
                   vocab_size=448, mrope_section=[3, 3, 2], drop_path_rate=0.1)


@pytest.fixture(scope="module")
def batch():
    return cost.stage1_batch(rows=2, seq_length=1024, vocab_size=TINY.vocab_size, buffer_size=32, seed=1)


def block_gemm_flops(trace: cost.Trace) -> float:
    return sum(op.flops for op in trace.ops if op.kind == "gemm" and op.region.startswith("block."))


def on_every_slot(credited_blocks: float, batch) -> float:
    """The credited block term (6 x N_blk x T over real tokens) on every slot of the rows: the blocks run on padding
    too (MFU does not credit it)."""
    real = int((batch["sample_ids"] >= 0).sum())
    return credited_blocks * batch["sample_ids"].numel() / real


def head_gemm_flops(trace: cost.Trace) -> float:
    return sum(op.flops for op in trace.ops if op.kind == "gemm" and op.region == "head")


def test_counted_gemm_flops_equal_the_credited_block_and_head_terms(batch, monkeypatch):
    credited = cost.credited_parts(TINY, batch)
    loss = "fused" if cost.has_option("fused") else "reference"
    trace = cost.trace_step(TINY, batch, checkpointing="none", loss_impl=loss)
    # 6 x N_blk x T over the blocks and 6 x e x V x N_lab for the head: the same sums of 2 M N K products
    assert block_gemm_flops(trace) == pytest.approx(on_every_slot(credited["blocks"], batch), rel=1e-12)
    assert head_gemm_flops(trace) == pytest.approx(credited["head"], rel=1e-12)
    # the reference loss without chunking (no chunk recomputation) runs the same three GEMMs
    ref = cost.trace_step(replace(TINY, loss_chunk_size=0), batch, checkpointing="none", loss_impl="reference")
    assert head_gemm_flops(ref) == pytest.approx(credited["head"], rel=1e-12)
    # the count follows the code: an extra d x d matmul in the MLP adds 6 x d^2 x T per block
    from megatron_genlip.model import layers

    forward = layers.SwiGLU.forward

    def planted(self, x):
        return forward(self, x) + x @ x.new_empty(x.shape[-1], x.shape[-1]).requires_grad_()  # a weight

    monkeypatch.setattr(layers.SwiGLU, "forward", planted)
    more = cost.trace_step(TINY, batch, checkpointing="none", loss_impl=loss)
    extra = 6 * TINY.hidden_size ** 2 * batch["sample_ids"].numel() * TINY.num_layers
    assert block_gemm_flops(more) == pytest.approx(on_every_slot(credited["blocks"], batch) + extra, rel=1e-12)


@pytest.mark.parametrize("mode,ratio", [("full", 4 / 3), ("selective", 1.0)])
def test_recomputation_executes_4_3_full_and_3_3_selective(batch, mode, ratio):
    if mode == "selective" and not cost.has_option("selective"):
        pytest.skip("train.activation_checkpointing=selective does not exist in this tree (model/recompute.py)")
    credited = cost.credited_parts(TINY, batch)
    trace = cost.trace_step(TINY, batch, checkpointing=mode, loss_impl="reference")
    assert block_gemm_flops(trace) == pytest.approx(ratio * on_every_slot(credited["blocks"], batch), rel=1e-12)
    # the attention kernel: forward recomputed under full, kept under selective
    fwd = sum(op.kind == "attention" and op.attention["pass"] == "fwd" and op.region == "block.1" for op in trace.ops)
    assert fwd == (2 if mode == "full" else 1)


def brute_force_tiles(sample_ids, token_kinds, bq, bk):
    mask = sdpa_mask(sample_ids, token_kinds)[:, 0]  # [B, L, L], the rule the flex mask_mod evaluates
    B, L, _ = mask.shape
    out = {"full": 0, "partial": 0, "empty": 0, "allowed": int(mask.sum())}
    for b in range(B):
        for q0 in range(0, L, bq):
            for k0 in range(0, L, bk):
                tile = mask[b, q0:q0 + bq, k0:k0 + bk]
                n = int(tile.sum())
                out["empty" if n == 0 else "full" if n == tile.numel() else "partial"] += 1
    return out


@pytest.mark.parametrize("seq_length", [1024, 1000])  # 1000: edge tiles narrower than the block
@pytest.mark.parametrize("block", [128, 64, (128, 64), 256])
def test_tile_counts_equal_a_brute_force_count_of_the_mask(seq_length, block):
    b = cost.stage1_batch(rows=2, seq_length=seq_length, vocab_size=64, buffer_size=16, seed=3)
    assert (b["sample_ids"] < 0).any()  # rows end in padding (the padding diagonal is counted too)
    bq, bk = (block, block) if isinstance(block, int) else block
    got = cost.tile_counts(b["sample_ids"], b["token_kinds"], block)
    want = brute_force_tiles(b["sample_ids"], b["token_kinds"], bq, bk)
    assert (got["full"], got["partial"], got["empty"]) == (want["full"], want["partial"], want["empty"])
    assert got["allowed_entries"] == want["allowed"]


def test_tile_counting_head_dim_rounding_is_torchs():
    assert [cost.next_power_of_two(d) for d in (64, 72, 96, 128)] == [64, 128, 128, 128]


def _toy_trace(fn, *args):
    rec = cost.OpRecorder()
    with rec, rec.region("block.0"):
        out = fn(*args)
    return rec, out


def _key(t):
    return (cost._storage_id(t), 0)


def test_island_model_on_a_hand_checkable_graph():
    """x [1024, 256] fp32 (1 MiB), w [256, 256] (256 KiB):

        a = x * 2; b = a + 1; c = b @ w; d = relu(c); e = d + x

    eager: a 2 MiB, b 2, d 2, e 3 -> 9 MiB in 4 kernels. Compiled: {a, b} reads x and writes b for the GEMM
    (2 MiB); {d, e} reads c and x and writes e, the output (3 MiB): 5 MiB in 2 kernels. Ideal-fusion floor: x and
    c read once, b and e written once: 4 MiB (x is read by both islands of the model, once by the floor)."""
    MiB = 2 ** 20
    x = torch.empty(1024, 256, device="meta")
    w = torch.empty(256, 256, device="meta")

    def f(x, w):
        b = x * 2 + 1
        return torch.relu(b @ w) + x

    rec, e = _toy_trace(f, x, w)
    eager = cost.element_traffic(rec.ops, lambda r: False, {_key(e)})[("block.0", "fwd")]
    assert (eager.bytes, eager.kernels) == (9 * MiB, 4)
    comp = cost.element_traffic(rec.ops, lambda r: True, {_key(e)})[("block.0", "fwd")]
    assert (comp.bytes, comp.kernels, comp.islands) == (5 * MiB, 2, 2)
    floor = cost.element_traffic(rec.ops, lambda r: True, {_key(e)}, floor=True)[("block.0", "fwd")]
    assert (floor.bytes, floor.islands) == (4 * MiB, 1)


def test_island_model_merges_identical_ops_and_splits_at_a_global_reduction():
    """y = x / max|x| twice over the same x (two consumers casting the same input, like FP8's q/gate/k/v before the
    shared cast): compiled, the second chain is the first (CSE); the global max ends a kernel, so the division
    reads x again: {abs, max} reads x (1 MiB), {div} reads x and writes y (2 MiB) -> 3 MiB, not 2."""
    MiB = 2 ** 20
    x = torch.empty(1024, 256, device="meta")

    def f(x):
        y1 = x / x.abs().amax()
        y2 = x / x.abs().amax()
        return y1, y2

    rec, (y1, y2) = _toy_trace(f, x)
    comp = cost.element_traffic(rec.ops, lambda r: True, {_key(y1)})[("block.0", "fwd")]
    assert comp.bytes == pytest.approx(3 * MiB, abs=64)  # + the 4-byte scalar
    assert comp.islands == 2
    eager = cost.element_traffic(rec.ops, lambda r: False, {_key(y1), _key(y2)})[("block.0", "fwd")]
    assert eager.kernels == 6  # abs, amax, div per chain
    # the floor ignores the reduction's barrier: x read once, y written once, the scalar never leaves the island
    floor = cost.element_traffic(rec.ops, lambda r: True, {_key(y1)}, floor=True)[("block.0", "fwd")]
    assert floor.bytes == 2 * MiB


def test_ideal_fusion_floor_bounds_the_island_model_on_the_model(batch):
    """On the real (tiny) model's selective-checkpointing trace, per graph: the floor moves no more than the island
    model and at least what crosses the GEMM/attention boundary once; the backward (recomputation, token-dimension
    reductions) strictly less. The floor is a lower bound of compiled blocks only: eager designs refuse it."""
    trace = cost.trace_step(TINY, batch, checkpointing="selective", loss_impl="fused", attention="varlen")
    compiled = lambda r: r.startswith("block.")
    islands = cost.element_traffic(trace.ops, compiled, trace.outputs)
    floor = cost.element_traffic(trace.ops, compiled, trace.outputs, floor=True)
    for graph in ("fwd", "bwd"):
        got, model = floor[("block.1", graph)], islands[("block.1", graph)]
        assert 0 < got.bytes <= model.bytes and got.islands == 1, (graph, got, model)
    assert floor[("block.1", "bwd")].bytes < 0.9 * islands[("block.1", "bwd")].bytes
    # the floor counted directly (after the same CSE): per graph, each value the element-wise ops read but did not
    # make, and each value they make that a GEMM, the attention kernel, another graph or the step's outputs read
    graph_of = lambda op: (op.region, op.graph) if compiled(op.region) else None
    ops = [op for op in cost.cse(trace.ops, graph_of) if op.kind in ("elementwise", "gemm", "attention", "sync")]
    for graph in ("fwd", "bwd"):
        ew = [op for op in ops if op.kind == "elementwise" and graph_of(op) == ("block.1", graph)]
        made = {w.key for op in ew for w in op.writes}
        crossing = {(r.key, r.view): r.nbytes for op in ew for r in op.reads if r.key not in made}
        leaving = {w.key for op in ops if op.kind != "elementwise" or graph_of(op) != ("block.1", graph)
                   for w in op.reads} | set(trace.outputs)
        crossing.update({(w.key, w.view): w.nbytes for op in ew for w in op.writes if w.key in leaving})
        assert floor[("block.1", graph)].bytes == sum(crossing.values()), graph
    credited = cost.credited_parts(TINY, batch)
    after = cost.evaluate(TINY, batch, trace, cost.AFTER, cost.Assumptions(), credited)
    low = cost.evaluate(TINY, batch, trace, replace(cost.AFTER, fusion="floor"), cost.Assumptions(), credited)
    assert low["step_seconds"] < after["step_seconds"]
    with pytest.raises(ValueError, match="floor"):
        cost.evaluate(TINY, batch, trace, replace(cost.AFTER, compiled=False, fusion="floor"), cost.Assumptions(),
                      credited)


def test_predict_gives_components_for_gpu_run():
    cfg_overrides = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
                     "model.num_attention_heads=4", "model.text_embed_dim=64", "model.mrope_section=[3,3,2]",
                     "model.vocab_size=448", "data.seq_length=1024", "train.micro_batch_size=2",
                     "data.pack_buffer_size=32"]
    out = cost.predict(str(RECIPE), {"design": "before", "eta_hbm": 0.8},
                       overrides=cfg_overrides)
    names = [c["name"] for c in out["components"]]
    assert names[0] == "block GEMMs" and any(n.startswith("attention") for n in names)
    assert out["assumptions"]["eta_hbm"] == 0.8
    assert out["step_seconds"] == pytest.approx(sum(c["seconds"] for c in out["components"]))
    assert 0 < out["mfu"] < 1
    assert cost.rows_per_gpu_step(load_config(RECIPE)) == 16  # the recipe's rows per GPU and step (4 x 4)


def brute_force_fa2_tiles(q_lengths, k_lengths, tile, causal):
    """(computed, masked) tiles of FA2 over (query, key) segments, by enumerating every entry of every tile (causal
    aligned at the segments' ends)."""
    bm, bn = tile
    computed = masked = 0
    for nq, nk in zip(q_lengths, k_lengths):
        for q0 in range(0, nq, bm):
            rows = torch.arange(q0, min(nq, q0 + bm))[:, None]
            for k0 in range(0, nk, bn):
                cols = torch.arange(k0, k0 + bn)[None, :]
                allowed = (cols < nk) & ((cols <= rows + nk - nq) if causal else True)
                if allowed.any():
                    computed += 1
                    masked += int(not allowed.all())
    return computed, masked


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tile", [cost.FA2_FWD_TILE, cost.FA2_BWD_TILE])
def test_fa2_segment_tiles_equal_a_brute_force_count(causal, tile):
    import numpy as np

    q = [270, 202, 68, 1, 128, 64, 300, 196, 0, 74, 74, 5]
    k = [270, 202, 68, 1, 128, 64, 300, 196, 0, 270, 0, 140]  # equal, then text queries over whole samples
    got = cost._segment_tiles(np.array(q), np.array(k), tile, causal)
    assert got == brute_force_fa2_tiles(q, k, tile, causal)


def test_varlen_design_counts_two_calls_per_pass_and_fa2_head_dim(batch):
    """model.attention=varlen traced through the model's own kernel (torch's varlen custom op on meta): two calls per
    forward and per backward, kept under selective checkpointing; FA2 computes head dim 72 as 96 (not 128)."""
    assert [fa2_head_dim(d) for d in (64, 72, 96, 100, 128, 140, 160, 200)] == [64, 96, 96, 128, 128, 160, 160, 256]
    trace = cost.trace_step(TINY, batch, checkpointing="selective", loss_impl="fused", attention="varlen")
    names = [op.name for op in trace.ops if op.kind == "attention" and op.region == "block.1"]
    assert names == ["_varlen_attn", "_varlen_attn", "_varlen_attn_backward", "_varlen_attn_backward"], names
    credited = cost.credited_parts(TINY, batch)
    r = cost.evaluate(TINY, batch, trace, replace(cost.AFTER, compiled=False), cost.Assumptions(), credited)
    att = next(c for c in r["components"] if c["name"].startswith("attention"))
    assert att["name"] == "attention (varlen FA2)" and att["detail"]["head_dim_rounded"] == 16 * 2
    # executed >= the exact mask's work, and the tile counts are those of the segments the model builds
    assert att["executed_flops"] >= att["detail"]["exact_mask_flops"]
    tiles = cost.varlen_tile_counts(batch["sample_ids"], batch["token_kinds"])
    assert tiles["segments"] == att["detail"]["segments"]


def test_varlen_call_a_computes_no_tile_of_a_caption(batch):
    """Call A's key segments give each text run none of its keys (they sit in the run's empty-query gap), so call
    A's tiles are exactly those of the image and padding runs over themselves; call B's are those of the text runs
    over their samples so far, plus the padding runs over themselves (their outputs come from call A; a few tiles
    per row, 0.3% of the recipe's)."""
    import numpy as np
    from megatron_genlip.batch import KIND_TEXT
    from megatron_genlip.model.attention import varlen_mask

    m = varlen_mask(batch["sample_ids"], batch["token_kinds"])
    q = np.diff(m.cu_q.numpy().astype(np.int64))[:m.segments]
    starts = m.cu_q.numpy()[:m.segments].astype(np.int64)
    sid, kinds = batch["sample_ids"].reshape(-1).numpy(), batch["token_kinds"].reshape(-1).numpy()
    L = batch["sample_ids"].shape[1]
    text = np.array([n > 0 and kinds[s] == KIND_TEXT for s, n in zip(starts, q)])
    other = ~text & (q > 0)
    pad = other.copy()
    pad[other] = sid[starts[other]] < 0
    assert pad.any() and not (kinds[starts[other]] == KIND_TEXT).any()

    def sample_start(t):  # the first token of t's sample in its row
        while t % L and sid[t - 1] == sid[t]:
            t -= 1
        return t

    keys_b = np.array([s + n - sample_start(s) for s, n in zip(starts[text], q[text])])
    tiles = cost.varlen_tile_counts(batch["sample_ids"], batch["token_kinds"])
    for pas, tile in (("fwd", cost.FA2_FWD_TILE), ("bwd", cost.FA2_BWD_TILE)):
        assert tiles[f"a_{pas}_tiles"] == cost._segment_tiles(q[other], q[other], tile, False)[0]
        b_text = cost._segment_tiles(q[text], keys_b, tile, True)[0]
        b_pad = cost._segment_tiles(q[pad], q[pad], tile, True)[0]
        assert tiles[f"b_{pas}_tiles"] == b_text + b_pad


def test_cli_prices_one_design_with_the_fp8_comparison(tmp_path):
    """benchmarks/cost_model.py --designs after on a config with the FP8 comparison (which prices 'before' too):
    once crashed looking up the sensitivity of a design the list did not name."""
    import importlib.util
    import json

    path = Path(__file__).resolve().parents[1] / "benchmarks/cost_model.py"
    spec = importlib.util.spec_from_file_location("cost_model_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    tiny = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176", "model.num_attention_heads=4",
            "model.text_embed_dim=64", "model.mrope_section=[3,3,2]", "model.vocab_size=448",
            "data.pack_buffer_size=32"]
    out = tmp_path / "cost.json"
    args = ["--config", str(RECIPE), "--rows", "2", "--seq-length", "1024", "--designs", "after",
            "--fp8-configs", "So16", "--json", str(out)] + [a for s in tiny for a in ("--set", s)]
    assert cli.main(args) == 0
    report = json.loads(out.read_text())["configs"]["So16"]
    assert set(report["designs"]) == {"after", "before", "after, ideal-fusion floor"}
    assert set(report["fp8"]) == {"before + FP8", "after + FP8", "after + FP8, ideal-fusion floor"}
    assert report["designs"]["after"]["step_seconds"] < report["designs"]["before"]["step_seconds"]
    # the ideal-fusion floor of 'after' is priced (bf16 and FP8) and is a lower bound of it
    floor = report["designs"]["after, ideal-fusion floor"]
    assert floor["design"]["fusion"] == "floor"
    assert floor["step_seconds"] < report["designs"]["after"]["step_seconds"]
    fp8 = report["fp8"]
    assert fp8["after + FP8, ideal-fusion floor"]["step_seconds"] < fp8["after + FP8"]["step_seconds"]
