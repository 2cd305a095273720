"""Fast checks that recompute a trainer quantity independently of the code that produces it: the next-token
loss from the logits of every slot, and the tensor-parallel split table from the attributes megatron-core sets on
the layers themselves. Each kills a one-line mutation that only slow tests caught before."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import random_image, small_model_config
from megatron_genlip.batch import IGNORE_INDEX
from megatron_genlip.data.packing import collate_batch
from megatron_genlip.data.sample import build_sample
from megatron_genlip.model.genlip import build_model
from megatron_genlip.parallel.sharding import partition_dim

LOSS_TOLERANCE = 1e-5  # fp32, the same logits reduced in another order


def test_loss_is_next_token_cross_entropy_of_every_labelled_slot(qwen_tokenizer):
    """Slot i predicts the label of slot i + 1 (GENLIP_SPEC.md §2.9): the model's loss equals the plain token-mean
    cross-entropy of the all-slot logits shifted by one, over two packed rows of two samples each."""
    rows = [[build_sample(qwen_tokenizer, random_image((2, 2), 2 * r + j), (2, 2), f"row {r} sample {j} caption.")
             for j in range(2)] for r in range(2)]
    batch = collate_batch(rows, 64)
    model = build_model(small_model_config(), seed=0).eval()
    with torch.no_grad():
        loss = model(batch).loss
        logits = model.logits(batch).float()  # [B, L, V]: the head on every slot
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)
    assert (batch["labels"] != IGNORE_INDEX).sum() > 10
    assert torch.isclose(loss, expected, rtol=LOSS_TOLERANCE, atol=0), (float(loss), float(expected))


def test_split_table_matches_the_layers_megatron_core_built():
    """Every parameter's split dimension in parallel/sharding.py equals the ``partition_dim`` megatron-core's
    layer set on it (its attributes exist at TP=1 too); replicated parameters carry none."""
    model = build_model(small_model_config(), seed=0)
    wrong = []
    for name, p in model.named_parameters():
        built = p.partition_dim if getattr(p, "tensor_model_parallel", False) else None
        if partition_dim(name) != built:
            wrong.append(f"{name}: table {partition_dim(name)}, layer {built}")
    assert not wrong, wrong
    assert any(".mlp.gate_fc." in n for n, _ in model.named_parameters())
