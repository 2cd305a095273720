"""Bodies of the resharding unit tests; they run on every rank (see dist_harness.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from conftest import small_model_config
from megatron_genlip.model.genlip import build_model
from megatron_genlip.parallel import sharding, state


def partition_dims_match_megatron(rank: int, world: int, result_file: str) -> None:
    """On a real TP=2 model: megatron-core's ``tensor_model_parallel``/``partition_dim`` attributes against
    ``sharding.partition_dim``; split_tp/merge_tp against the shards and against the TP=1 model of the same
    seed (every layout starts from bit-identical weights)."""
    cfg = small_model_config(vocab_size=448)
    state.reinitialize(2)
    tp_model = build_model(cfg, 2, seed=3)
    report = {"sharded": {}, "replicated": [], "split_mismatch": [], "merge_mismatch": []}
    merged = {}
    for name, p in tp_model.named_parameters():
        attr = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        if attr is None:
            report["replicated"].append((name, sharding.partition_dim(name)))
        else:
            report["sharded"][name] = (attr, sharding.partition_dim(name))
        shards = [torch.empty_like(p.data) for _ in range(world)]
        dist.all_gather(shards, p.data.contiguous())
        merged[name] = sharding.merge_tp(name, shards)
        if not torch.equal(sharding.split_tp(name, merged[name], world, rank), p.data):
            report["split_mismatch"].append(name)
    state.reinitialize(1)
    one = dict(build_model(cfg, 1, seed=3).named_parameters())
    report["merge_mismatch"] = [n for n, t in merged.items() if n not in one or not torch.equal(t, one[n].data)]
    report["num_params"] = len(merged)
    if rank == 0:
        torch.save(report, result_file)
    dist.barrier()
