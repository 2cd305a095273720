"""Evaluation on the held-out split: validation loss and greedy captioning (exact match, token accuracy).

Work is split over data-parallel ranks and the sums are all-reduced over the data-parallel group (tensor-
parallel peers compute the same rows), so every rank returns the same numbers. The model passed in must hold full (not ZeRO-3-partitioned) parameters.

Metrics:
  val_loss            token-mean next-token loss over ``eval_rows`` held-out packed rows
  val_token_accuracy  teacher-forced argmax accuracy on the same labelled tokens
  caption_exact_match fraction of held-out images whose greedy caption equals the reference exactly
  caption_token_accuracy  position-wise agreement of generated and reference caption tokens, divided by
                      the longer of the two (a missing or extra token counts as wrong), averaged over images
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_genlip.batch import IGNORE_INDEX
from megatron_genlip.data.indexed import GenLIPIndexedDataset
from megatron_genlip.data.packed_dataset import PackedRows
from megatron_genlip.inference.generate import generate_caption
from megatron_genlip.model.genlip import select_labelled
from megatron_genlip.parallel import comm
from megatron_genlip.parallel.state import gather_last_dim
from megatron_genlip.training.errors import check_batch


def caption_token_accuracy(generated: list[int], reference: list[int]) -> float:
    longest = max(len(generated), len(reference))
    if longest == 0:
        return 1.0
    return sum(a == b for a, b in zip(generated, reference)) / longest


def reference_caption(sample) -> list[int]:
    """Labelled tokens of a stage-1 sample without the final <|im_end|> and "\\n"."""
    return sample.input_ids[sample.labels != IGNORE_INDEX].tolist()[:-2]


@torch.no_grad()
def validation_loss(model, rows: PackedRows, num_rows: int, dp_rank: int, dp_world: int, device) -> dict:
    """Token-mean loss and teacher-forced accuracy over the first ``num_rows`` held-out rows."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, tokens: summed on the device
    for r in range(dp_rank, min(num_rows, rows.rows_in_epoch(0)), dp_world):
        batch = {k: v for k, v in rows.batch([r]).items() if k != "row_index"}
        if r == dp_rank:  # the first held-out row, on the host
            check_batch(batch, f"held-out row {r}")
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model.final_hidden(batch)  # one forward serves the loss and the accuracy
        out = model.loss_from_hidden(hidden, batch["labels"], batch["sample_ids"])
        labelled, targets, _ = select_labelled(hidden, batch["labels"])  # the slots the loss ran on
        logits = gather_last_dim(model.head(labelled).float())
        totals[0] += out.token_losses.double().sum()
        totals[1] += (logits.argmax(-1) == targets).sum()
        totals[2] += out.num_tokens
    loss_sum, correct, count = comm.all_reduce(totals, group=parallel_state.get_data_parallel_group()).tolist()
    tokens = max(1.0, count)
    return {"val_loss": loss_sum / tokens, "val_token_accuracy": correct / tokens, "val_tokens": int(count)}


@torch.no_grad()
def caption_metrics(model, dataset: GenLIPIndexedDataset, tokenizer, prompt: str, num_images: int,
                    max_new_tokens: int, dp_rank: int, dp_world: int, examples: int = 4, records: int = 0) -> dict:
    """Greedy captions of the first ``num_images`` held-out samples against their references.

    Besides the totals: ``caption_examples``, the first ``examples`` images' reference and generated captions
    (for the summary), and ``caption_records``, the first ``records`` images' captions with their own exact
    match and token accuracy (for the contact sheet), on every rank."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64)  # exact, token accuracy sum, images
    keep = max(examples, records)
    mine = []
    for i in range(dp_rank, min(num_images, len(dataset)), dp_world):
        sample = dataset[i]
        ref = reference_caption(sample)
        gen = generate_caption(model, tokenizer, sample.patches, sample.grid, prompt, max_new_tokens)
        accuracy = caption_token_accuracy(gen, ref)
        totals += torch.tensor([float(gen == ref), accuracy, 1.0], dtype=torch.float64)
        if len(mine) < keep:
            mine.append({"index": i, "reference": tokenizer.decode(ref), "generated": tokenizer.decode(gen),
                         "exact": gen == ref, "token_accuracy": accuracy})
    group = parallel_state.get_data_parallel_group()  # tensor-parallel peers hold the same numbers
    comm.all_reduce(totals, group=group)  # host values: over the group's gloo twin where it is NCCL
    gathered = comm.all_gather_object(mine, group=group)
    first = sorted((e for part in gathered for e in part), key=lambda e: e["index"])[:keep]
    n = max(1.0, float(totals[2]))
    return {"caption_exact_match": float(totals[0]) / n, "caption_token_accuracy": float(totals[1]) / n,
            "caption_images": int(totals[2]),
            "caption_examples": [{k: e[k] for k in ("index", "reference", "generated")} for e in first[:examples]],
            "caption_records": first[:records]}
