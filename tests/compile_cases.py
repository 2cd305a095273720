"""The body of tests/test_compile.py, run in a fresh interpreter with dynamo enabled (the test session's platform
decision switches dynamo off for the CPU): compiled transformer blocks (model/recompute.py ``compile_block``, the
inductor backend: C++ kernels on CPU) against the same model eager, in every checkpointing mode, over several
packed micro-batches; recompilations are errors. Prints one JSON line of results."""

from __future__ import annotations

import json
import os
import sys

import torch

torch.set_num_threads(1)
torch._dynamo.config.error_on_recompile = True  # a second graph for the same runner fails the run
torch._inductor.config.fallback_random = True  # DropPath's draws as eager torch makes them

sys.path.insert(0, os.path.dirname(__file__))
from conftest import random_image, small_model_config  # noqa: E402
from megatron_genlip.data.packing import collate_batch  # noqa: E402
from megatron_genlip.data.sample import build_sample  # noqa: E402
from megatron_genlip.data.tokenizer import load_qwen_tokenizer  # noqa: E402
from megatron_genlip.model import recompute  # noqa: E402
from megatron_genlip.model.genlip import build_model  # noqa: E402

from megatron_genlip import platform  # noqa: E402

platform.compile_on_purpose()  # conftest made the session's CPU decision (dynamo off); this process compiles


def batches(n: int):
    """``n`` micro-batches of 2 packed rows x 64 slots, each packed differently (other images, captions, counts)."""
    tok = load_qwen_tokenizer()
    out = []
    for b in range(n):
        rows = []
        for r in range(2):
            grids = [(2, 3), (3, 2), (2, 2)][: 1 + (b + r) % 3]
            rows.append([build_sample(tok, random_image(g, 10 * b + 3 * r + i), g, "a shape " * (1 + (b + i) % 4))
                         for i, g in enumerate(grids)])
        out.append(collate_batch(rows, 64))
    return out


def fused_loss_kernels() -> dict:
    """The fused loss's chunk functions (model/fused_loss.py) compiled as on CUDA (dynamic shapes) against eager,
    on bf16 logits of two chunk lengths (one graph each function: the length is dynamic) and a vocabulary shard
    that holds some of the targets."""
    from megatron_genlip.model import fused_loss as fl

    compiled = [torch.compile(fn, dynamic=True, backend="inductor") for fn in (fl.chunk_max, fl.chunk_sums,
                                                                              fl.chunk_grad)]
    out = {}
    g = torch.Generator().manual_seed(0)
    for rows in (37, 64):
        logits = (4 * torch.randn(rows, 1000, generator=g)).to(torch.bfloat16)
        t = torch.randint(0, 2000, (rows,), generator=g)
        outside = t >= 1000  # a shard [0, 1000) of a 2000-word vocabulary
        local_t = torch.where(outside, torch.zeros_like(t), t)
        results = []
        for find_max, find_sums, find_grad in ((fl.chunk_max, fl.chunk_sums, fl.chunk_grad), compiled):
            top = find_max(logits)
            sum_exp, picked = find_sums(logits, top, local_t, outside)
            results.append((top, sum_exp, picked, find_grad(logits, top, sum_exp, local_t, outside, 1 / 97,
                                                            torch.bfloat16)))
        (m0, s0, p0, g0), (m1, s1, p1, g1) = results
        out[rows] = {"max": float((m1 - m0).abs().max()), "sum_exp": float(((s1 - s0) / s0).abs().max()),
                     "picked": float((p1 - p0).abs().max()),
                     "grad": float((g1.float() - g0.float()).abs().max() / g0.float().abs().max())}
    return out


_RUNS: list = []


@torch.library.custom_op("genlip_test::count_runs", mutates_args=())
def _count_runs(x: torch.Tensor) -> torch.Tensor:
    _RUNS.append(1)
    return x.clone()


_count_runs.register_fake(lambda x: torch.empty_like(x))
_count_runs.register_autograd(lambda ctx, grad: grad)


def _kernel(q, k, v):
    """A stand-in for an attention kernel compiled by model/attention.py (FlexAttention compiles only on CUDA):
    scores, softmax, weighted values; its counter op runs whenever the compiled code runs."""
    return torch.softmax(_count_runs(q) @ k.transpose(-1, -2), dim=-1) @ v


def eager_block_keeps_compiled_attention() -> dict:
    """A block that runs eagerly (ZeRO-3) calling an attention kernel compiled as model/attention.py compiles it,
    under selective checkpointing with the model's policy: the compiled code runs once in forward and not again in
    backward (its outputs are kept), and the gradients equal the uncheckpointed ones."""
    from megatron_genlip.model import attention

    kernel = attention._compiled(_kernel)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, 8, generator=g), torch.randn(8, 24, generator=g)

    def block(x, w):
        q, k, v = (x @ w).cos().split(8, dim=-1)
        return kernel(q, k, v).sin()

    out = {}
    for mode in ("none", "selective"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        _RUNS.clear()
        y = block(xs, ws) if mode == "none" else torch.utils.checkpoint.checkpoint(
            block, xs, ws, use_reentrant=False, context_fn=recompute._sac_context)
        forward_runs = len(_RUNS)
        y.square().sum().backward()
        out[mode] = {"forward_runs": forward_runs, "backward_runs": len(_RUNS) - forward_runs,
                     "grads": [xs.grad, ws.grad]}
    err = max(float((a - b).abs().max()) for a, b in zip(out["none"]["grads"], out["selective"]["grads"]))
    return {mode: {k: v for k, v in r.items() if k != "grads"} for mode, r in out.items()} | {"grad_err": err}


def main() -> None:
    data = batches(3)
    errors = {}
    # the dense reference kernel and the recipe's varlen one (its CPU path; the 3 micro-batches give one segment
    # capacity and longest segments, so one graph per mode)
    graphs = 0
    for attention in ("sdpa", "varlen"):
        torch._dynamo.reset()  # a run has one kernel: its blocks' graphs start afresh (the guard is on the mask type)
        counters = torch._dynamo.utils.counters
        counters.clear()
        cfg = small_model_config(drop_path_rate=0.2, num_layers=2, attention=attention)
        eager = build_model(cfg, seed=0).train()
        compiled = build_model(cfg, seed=0).train()
        for block in recompute.blocks_of(compiled):
            recompute.compile_block(block, backend="inductor")
        for mode in recompute.MODES:
            eager.activation_checkpointing = compiled.activation_checkpointing = mode
            for i, batch in enumerate(data):
                results = []
                for model in (eager, compiled):
                    model.zero_grad(set_to_none=True)
                    torch.manual_seed(1000 + i)
                    out = model(batch)
                    out.loss.backward()
                    results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
                (l0, g0), (l1, g1) = results
                worst = max(float((g1[n] - g0[n]).abs().max() / g0[n].abs().max().clamp_min(1e-30)) for n in g0)
                errors[f"{attention}/{mode}/{i}"] = {"loss": float((l1 - l0).abs() / l0.abs()), "grad": worst}
        graphs += counters["stats"]["unique_graphs"]
    torch._dynamo.utils.counters.clear()
    loss_errors = fused_loss_kernels()
    loss_graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    kept = eager_block_keeps_compiled_attention()
    print(json.dumps({"errors": errors, "unique_graphs": graphs, "loss_kernels": loss_errors, "kept_attention": kept,
                      "loss_graphs": loss_graphs,
                      "state_dict_equal_names": list(eager.state_dict()) == list(compiled.state_dict())}))


if __name__ == "__main__":
    main()
