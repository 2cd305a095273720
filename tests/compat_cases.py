"""Bodies of compat canaries that need a DeepSpeed engine; they run on every rank (see dist_harness.run_ranks)."""

from __future__ import annotations

import deepspeed
import torch

from megatron_genlip import compat


def _zero0_fp32_step_norm() -> tuple[float | None, float]:
    """One ZeRO-0 fp32 step with clipping: (DeepSpeed's reported grad norm, the true pre-clip norm)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    loss = engine(torch.randn(2, 8)).square().sum()
    engine.backward(loss)
    true_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
    engine.step()
    reported = engine.get_global_grad_norm()
    return (None if reported is None else float(reported)), true_norm


def fp32_clip_norm(rank: int, world: int, result_file: str) -> None:
    """Stock DeepSpeed 0.19.8 drops the ZeRO-0 fp32 clip norm; compat's patch (applied at process start) keeps it."""
    deepspeed.init_distributed(verbose=False)  # DeepSpeed's comm layer over the harness's gloo group
    with compat.stock("deepspeed-fp32-clip-norm"):
        stock = _zero0_fp32_step_norm()
    patched = _zero0_fp32_step_norm()
    torch.save({"stock": stock, "patched": patched}, result_file)
