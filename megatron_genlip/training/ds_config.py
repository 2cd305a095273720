"""The one place that turns the project config into DeepSpeed's JSON config."""

from __future__ import annotations

from megatron_genlip.config import Config, Layout
from megatron_genlip.platform import Platform
from megatron_genlip.training.checkpoint import resumes_from_universal


def deepspeed_config(cfg: Config, layout: Layout, platform: Platform, load_universal: bool | None = None) -> dict:
    """DeepSpeed's config for ``cfg`` at ``layout``; the Adam implementation and ZeRO's communication overlap and
    buckets come from the platform decision. ``load_universal``: the run resumes from a resharded (universal)
    checkpoint (None: guess from ``latest``, for dry runs; the trainer passes what rank 0 chose)."""
    t, p = cfg.train, cfg.parallel
    zero: dict = {"stage": p.zero_stage, **platform.zero_settings(p.zero_stage)}
    if p.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=False)
    ds = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accumulation,
        "gradient_clipping": t.clip_grad,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": False},
        # fp32 master weights and Adam moments, fp32 gradient all-reduce (GENLIP_SPEC.md §5, §11). DeepSpeed
        # accumulates the micro-batches' gradients in the model dtype (bf16) before that all-reduce
        # (grad_accum_dtype defaults to it); fp32 accumulation would need its BF16_Optimizer (ZeRO-1 only)
        "communication_data_type": "fp32",
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [t.adam_beta1, t.adam_beta2],
                "eps": t.adam_eps,
                "weight_decay": t.weight_decay,
                **platform.optimizer_params(),  # torch's AdamW: fused on CUDA, for-loop on CPU
            },
        },
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the trainer logs; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
        "dump_state": False,
    }
    if load_universal is None:
        load_universal = resumes_from_universal(cfg)
    if load_universal:  # a resharded checkpoint (tools/reshard_checkpoint.py): any TP/PP/DP layout
        ds["checkpoint"] = {"load_universal": True}
    return ds
