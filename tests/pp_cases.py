"""Bodies of the pipeline-parallel tests; they run on every rank (see dist_harness.run_ranks)."""

from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from conftest import small_model_config
from megatron_genlip.batch import pipeline_inputs
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.stages import build_pipeline
from megatron_genlip.parallel import state
from tp_cases import packed_batch


def packed_row_loss_under_tp_pp(rank: int, world: int, result_file: str) -> None:
    """One packed row through TP=2 x PP=2 vs each of its samples alone on one device."""
    deepspeed.init_distributed(verbose=False)  # DeepSpeed's comm layer over the existing gloo group
    cfg = small_model_config(vocab_size=151936)
    batch = packed_batch()
    row = {k: (v[:1] if k != "patches" else v[: int((batch["token_kinds"][0] == 1).sum())]) for k, v in batch.items()}
    state.reinitialize(2, 2)
    pipe = build_pipeline(cfg, 2, 2, seed=0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=pipe, model_parameters=[p for p in pipe.parameters()], config=ds)
    piped = float(engine.eval_batch(iter([pipeline_inputs(row)]), num_micro_batches=1))
    state.reinitialize(1)
    model = build_model(cfg, 1, seed=0).eval()
    with torch.no_grad():
        packed = model(row)
        alone = []
        for s in range(int(row["sample_ids"].max()) + 1):
            m = row["sample_ids"][0] == s
            n_img = int((row["token_kinds"][0][m] == 1).sum())
            first = int(((row["token_kinds"][0] == 1) & (row["sample_ids"][0] < s)).sum())
            single = {k: v[:, m] for k, v in row.items() if k not in ("patches", "positions")}
            single["positions"] = row["positions"][:, :, m]
            single["sample_ids"] = torch.zeros_like(single["sample_ids"])
            single["patches"] = row["patches"][first:first + n_img]
            out = model(single)
            alone.append((out.token_losses.sum(), out.num_tokens))
    combined = sum(a for a, _ in alone) / sum(n for _, n in alone)
    if rank == 0:
        torch.save({"pipeline": piped, "single_packed": float(packed.loss), "alone_combined": float(combined)},
                   result_file)
    dist.barrier()
