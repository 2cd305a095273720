"""Bodies of the checkpoint-saving tests on real DeepSpeed engines; they run on every rank (dist_harness)."""

from __future__ import annotations

import errno

import torch
import torch.distributed as dist

from conftest import small_model_config
from megatron_genlip.model.genlip import build_model
from megatron_genlip.parallel import state
from megatron_genlip.training import checkpoint as ckpt
from megatron_genlip.training.errors import CheckpointSaveError


def save_fails_on_one_rank(rank: int, world: int, ckpt_dir: str, result_file: str) -> None:
    """DP=2 ZeRO-1: the second save fails on rank 1 only (its optimizer partition hits a full disk) while rank 0
    writes all of its files. Both ranks must raise the same error (none may hang in a collective the other
    skipped), the partial tag must go and ``latest`` keep naming the first save."""
    import deepspeed

    state.reinitialize(1)
    cfg = small_model_config(vocab_size=448)
    model = build_model(cfg, 1, seed=0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    client = {"genlip": {"config": {"model": {"num_layers": cfg.num_layers}}, "iteration": 1}}
    ckpt.save_checkpoint(engine, ckpt_dir, 1, client, keep_last=2)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "optim_states" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    if rank == 1:
        torch.save = full_disk
    try:
        ckpt.save_checkpoint(engine, ckpt_dir, 2, client, keep_last=2)
        outcome = "saved"
    except CheckpointSaveError as e:
        outcome = str(e)
    finally:
        torch.save = real_save
    outcomes: list = [None] * world
    dist.all_gather_object(outcomes, outcome)
    if rank == 0:
        torch.save(outcomes, result_file)
    dist.barrier()


class ExtraStateProbe(torch.nn.Module):
    """What Transformer Engine's modules do with their FP8 scaling state: bytes in ``get_extra_state``, read
    back in ``set_extra_state``, where TE >= 2.18 refuses pickled state unless NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE=1
    (checkpoint.te_extra_state_loadable). It records that variable as the real DeepSpeed load calls it."""

    def __init__(self):
        super().__init__()
        self.seen: list = []

    def get_extra_state(self):
        return torch.tensor([7, 1], dtype=torch.uint8)

    def set_extra_state(self, state):
        import os

        self.seen.append((state.tolist(), os.environ.get(ckpt.TE_UNSAFE_PICKLE_ENV)))


def extra_state_loads_with_te_allowed(rank: int, world: int, ckpt_dir: str, result_file: str) -> None:
    """One rank: save a model holding an ExtraStateProbe, load it back through checkpoint.load_checkpoint."""
    import os

    import deepspeed

    state.reinitialize(1)
    model = build_model(small_model_config(vocab_size=448), 1, seed=0)
    model.fp8_state_probe = ExtraStateProbe()
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": 1}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds)
    client = {"genlip": {"config": {"model": {"num_layers": 2}}, "iteration": 1}}
    tag = ckpt.save_checkpoint(engine, ckpt_dir, 1, client, keep_last=2)
    before = os.environ.get(ckpt.TE_UNSAFE_PICKLE_ENV)
    ckpt.load_checkpoint(engine, ckpt_dir, tag)
    torch.save({"seen": model.fp8_state_probe.seen, "before": before,
                "after": os.environ.get(ckpt.TE_UNSAFE_PICKLE_ENV)}, result_file)
