"""Bodies of the sequence-parallel and RNG-tracker tests; they run on every rank (see dist_harness.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

from conftest import small_model_config
from megatron_genlip import compat
from megatron_genlip.data.tokenizer import load_qwen_tokenizer
from megatron_genlip.inference.generate import generate_caption
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.layers import DropPath
from megatron_genlip.parallel import rng, state
from tp_cases import full_gradients, packed_batch

DROP_SEED = 4  # with this seed DropPath (rate 0.1) drops some, not all, rows of packed_batch() (asserted)


def _gather_objects(obj) -> list:
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


def _stock_sequence_parallel_gather_fails() -> bool:
    """Canary of compat's ``cpu-current-device``: megatron-core's SP all-gather allocates on
    torch.cuda.current_device(), which fails on a CPU torch without the patch."""
    with compat.stock("cpu-current-device"):
        try:
            gather_from_sequence_parallel_region(torch.ones(2, 1, 3), group=state.tensor_parallel_group())
        except AssertionError as e:
            return "not compiled with CUDA" in str(e)
    return False


def _record_drop_path(model) -> dict:
    """DropPath module name -> per call (its two branches in forward, then again in a recomputation if any):
    (rows kept, activation length). A row is kept when its output is not all zero."""
    calls: dict = {}

    def hook(name, module, inputs, output):
        if module.training and module.rate > 0:
            calls.setdefault(name, []).append(((output != 0).any(-1).any(0).tolist(), inputs[0].shape[0]))

    for name, m in model.named_modules():
        if isinstance(m, DropPath):
            m.register_forward_hook(lambda mod, i, o, name=name: hook(name, mod, i, o))
    return calls


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def sp_matches_tp1(rank: int, world: int, result_file: str) -> None:
    """TP=2 + SP (with and without activation checkpointing) vs TP=1 on the same packed batch with DropPath
    0.1: loss, token losses and every gathered gradient; plus the canary, the sharded activation length, the
    drop decisions, and the unsplit (no-grad) fallback for a length not divisible by TP."""
    cfg = small_model_config(drop_path_rate=0.1)
    batch = packed_batch()  # [2, 80]
    odd = {k: (v[:, :, :79] if k == "positions" else v if k == "patches" else v[:, :79]) for k, v in batch.items()}
    tokenizer = load_qwen_tokenizer()
    res: dict = {}

    state.reinitialize(2)
    res["stock_gather_fails"] = _stock_sequence_parallel_gather_fails()
    res["patched_at_start"] = "cpu-current-device" in compat.applied()

    runs = {}
    for name, tp, sp, recompute in (("sp", 2, True, False), ("sp_recompute", 2, True, True), ("tp1", 1, False, False)):
        state.reinitialize(tp)
        model = build_model(cfg, tp, seed=0, sequence_parallel=sp).train()
        model.activation_checkpointing = recompute
        drops = _record_drop_path(model)
        rng.model_parallel_seed(DROP_SEED, dp_rank=0)
        out = model(batch)
        out.loss.backward()
        grads = full_gradients(model)
        replicated = [n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)]
        spread = 0.0  # replicated gradients must be identical on the TP ranks after the SP reduction
        for n, p in model.named_parameters():
            if not getattr(p, "tensor_model_parallel", False) and tp > 1:
                ref = p.grad.detach().clone()
                dist.broadcast(ref, src=dist.get_global_rank(state.tensor_parallel_group(), 0),
                               group=state.tensor_parallel_group())
                spread = max(spread, float((p.grad - ref).abs().max()))
        spread = max(_gather_objects(spread))  # rank 0 reports the largest difference of any rank
        model.eval()
        with torch.no_grad():  # the unsplit fallback: length 79 is not divisible by TP=2
            hidden_odd = model.final_hidden(odd)
        # and decoding with a KV cache (unsplit, no grad): 6 greedy tokens for the first image of the batch
        caption = generate_caption(model, tokenizer, batch["patches"][:12], (3, 4), max_new_tokens=6)
        grad_error = None
        try:
            model.final_hidden(odd)  # with autograd: must refuse, naming the fields
        except ValueError as e:
            grad_error = str(e)
        runs[name] = dict(loss=out.loss.detach(), token_losses=out.token_losses.detach(), grads=grads,
                          drops={k: [kept for kept, _ in v] for k, v in drops.items()},
                          lengths=sorted({n for v in drops.values() for _, n in v}), replicated=replicated,
                          spread=spread, hidden_odd=hidden_odd, grad_error=grad_error, caption=caption)

    ref = runs["tp1"]
    for name in ("sp", "sp_recompute"):
        got = runs[name]
        errors = {"loss": _rel(got["loss"], ref["loss"]),
                  "token_losses": _rel(got["token_losses"], ref["token_losses"]),
                  "hidden_odd_no_grad": _rel(got["hidden_odd"], ref["hidden_odd"])}
        errors.update({n: _rel(got["grads"][n], ref["grads"][n]) for n in ref["grads"]})
        res[name] = {"errors": errors, "lengths": got["lengths"], "replicated": got["replicated"],
                     "tp_spread": got["spread"], "grad_error": got["grad_error"],
                     "caption_equal_tp1": got["caption"] == ref["caption"] and len(got["caption"]) > 0,
                     "calls_per_drop_path": sorted({len(v) for v in got["drops"].values()}),
                     # a recomputation repeats the forward's calls (up to torch's early stop) with the same rows
                     "drops_equal_tp1": all(v == (ref["drops"][k] * 2)[:len(v)] for k, v in got["drops"].items())
                     and got["drops"].keys() == ref["drops"].keys(),
                     "drops_equal_over_tp": len({str(d) for d in _gather_objects(got["drops"])}) == 1}
    flat = [k for calls in ref["drops"].values() for call in calls for k in call]
    res["tp1_rows_dropped"], res["tp1_rows_kept"] = flat.count(False), flat.count(True)
    res["tp1_lengths"] = ref["lengths"]
    if rank == 0:
        torch.save(res, result_file)


def rng_streams(rank: int, world: int, result_file: str) -> None:
    """2 ranks as TP=2 (one data-parallel rank), then as DP=2 (TP=1): draws of each stream on each rank."""
    res = {}
    for layout, tp in (("tp2", 2), ("dp2", 1)):
        state.reinitialize(tp)
        seed = 7
        base = rng.model_parallel_seed(seed)
        tracker = rng.get_tracker()
        replicated = torch.rand(6)
        with tracker.fork():  # "model-parallel-rng"
            tensor_parallel = torch.rand(6)
        with tracker.fork(rng.DATA_PARALLEL):
            data_parallel = torch.rand(6)
        x = torch.ones(4, 32, 2)
        kept = (DropPath(0.5).train()(x) != 0).any(-1).any(0)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        dp_rank = parallel_state.get_data_parallel_rank()
        expected = {"replicated": torch.rand(6, generator=torch.Generator().manual_seed(seed + 1000 * dp_rank)),
                    "tensor_parallel": torch.rand(6, generator=torch.Generator().manual_seed(
                        seed + 1000 * dp_rank + 2718 + tp_rank))}
        mine = {"replicated": replicated, "tensor_parallel": tensor_parallel, "data_parallel": data_parallel,
                "drop_path_kept": kept, "base": base, "tp_rank": tp_rank, "dp_rank": dp_rank,
                "matches_megatron_seeds": all(torch.equal(mine_v, expected[k]) for k, mine_v in
                                              (("replicated", replicated), ("tensor_parallel", tensor_parallel)))}
        res[layout] = _gather_objects(mine)
    if rank == 0:
        torch.save(res, result_file)
