"""``validation_loss``: token-mean next-token loss and teacher-forced token accuracy on held-out packed rows.

Data: an indexed dataset (``data``; default ``data.valid_data``) packed into rows as in training
(``data/packed_dataset.open_rows``). Options: ``rows`` (held-out rows; 0 = ``train.eval_rows``),
``micro_batch_size`` (rows per forward; 0 = ``train.micro_batch_size``). Rows are split over data-parallel ranks
and the sums all-reduced. Under pipeline parallelism the loss goes through the pipeline engine
(``EvalContext.pipeline_loss``: a loader of packed batches -> token-mean loss; the trainer's is
:func:`pipeline_token_loss`), without the token accuracy: the same number as one rank's token-mean over the same
rows (DeepSpeed's own ``eval_batch`` reduction would average the micro-batches' own means instead, each
micro-batch weighing alike whatever its number of caption tokens, and broadcast the result in fp32).

Metrics: ``val_loss``, ``val_token_accuracy``, ``val_tokens`` (``val_loss``, ``val_rows`` under PP).
"""

from __future__ import annotations

import torch

from megatron_genlip.batch import BatchError, PackedBatch, pipeline_inputs, predicts_label
from megatron_genlip.config import ConfigError
from megatron_genlip.evaluation.base import EvalContext, EvalResult, Evaluator, need
from megatron_genlip.evaluation.data import EvalDataError
from megatron_genlip.model.genlip import select_labelled
from megatron_genlip.parallel import comm
from megatron_genlip.parallel.state import gather_last_dim


def tokenizer_fp(cfg) -> str:
    from megatron_genlip.data.tokenizer import tokenizer_fingerprint

    return tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path)


@torch.no_grad()
def pipeline_token_loss(engine, device, loader) -> float:
    """The token-mean loss of ``loader``'s packed micro-batches (this data-parallel rank's share) through DeepSpeed's
    pipeline ``engine``, over every data-parallel rank: the last stage weighs each micro-batch's loss (the token mean
    of its caption tokens, ``HeadStage``) by its number of caption tokens; the sums are added over the data-parallel
    group and shared over the pipeline group. Collective over every rank of the run."""
    from megatron.core import parallel_state

    # the caption-token count of each micro-batch, on the host (labels only); the batches go to the device one at a
    # time as the schedule asks for them
    counts = [float(predicts_label(b["labels"]).sum()) for b in loader]
    feed = (pipeline_inputs({k: v.to(device) for k, v in b.items() if k != "row_index"}) for b in loader)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # loss x tokens, tokens (last stage only)
    # reduce_output=None: the micro-batches' losses as they are, on the last stage (no fp32 broadcast of a mean)
    losses = engine.eval_batch(data_iter=feed, num_micro_batches=len(counts), reduce_output=None, bcast_loss=False)
    if engine.is_last_stage():
        for loss, tokens in zip(losses, counts):
            totals[0] += loss.double().reshape(()) * tokens
            totals[1] += tokens
    comm.all_reduce(totals, group=parallel_state.get_data_parallel_group())
    comm.all_reduce(totals, group=parallel_state.get_pipeline_model_parallel_group())
    loss_sum, tokens = totals.tolist()
    return loss_sum / max(1.0, tokens)


class ValidationLoss(Evaluator):
    type_name = "validation_loss"
    OPTIONS = {"rows": 0, "micro_batch_size": 0}
    needs_full_model = False
    metric_keys = ("val_loss", "val_token_accuracy")

    def __init__(self, spec, cfg, tokenizer=None):
        super().__init__(spec, cfg, tokenizer)
        self.rows = None  # PackedRows; the trainer may hand in the ones it opened (trainer.valid_rows)
        self.num_rows = self.options["rows"] or cfg.train.eval_rows
        self.micro = self.options["micro_batch_size"] or cfg.train.micro_batch_size

    @classmethod
    def validate_options(cls, options, where):
        need(options["rows"] >= 0, f"{where}.options.rows", ">= 0 (0 = train.eval_rows)")
        need(options["micro_batch_size"] >= 0, f"{where}.options.micro_batch_size",
             ">= 0 (0 = train.micro_batch_size)")

    def prepare(self, ctx: EvalContext) -> None:
        if self.rows is None:
            from megatron_genlip.data.packed_dataset import open_rows

            spec = self.spec.data or self.cfg.data.valid_data
            if not spec:
                raise ConfigError(f"evaluation.{self.name}.data: not set and data.valid_data is empty")
            try:
                self.rows = open_rows(spec, self.cfg.data, tokenizer_fp(self.cfg))
                self.rows.ensure(epochs=1, log=(print if ctx.dp_rank == 0 else (lambda *_: None)))
            except (OSError, ValueError) as e:
                raise EvalDataError(f"evaluation.{self.name}: held-out rows {spec}: {e}") from None
        self.prepared = True

    def _row_ids(self, ctx: EvalContext) -> list[int]:
        return list(ctx.mine(min(self.num_rows, self.rows.rows_in_epoch(0))))

    @torch.no_grad()
    def run(self, model, ctx: EvalContext) -> EvalResult:
        if not self.prepared:
            self.prepare(ctx)
        if ctx.pipeline_loss is not None:
            return self._run_pipeline(ctx)
        was_training = model.training
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64, device=ctx.device)  # loss sum, correct, tokens
        mine = self._row_ids(ctx)
        for start in range(0, len(mine), self.micro):
            batch = {k: v for k, v in self.rows.batch(mine[start:start + self.micro]).items() if k != "row_index"}
            if start == 0:
                try:
                    PackedBatch().validate(batch)
                except BatchError as e:
                    raise EvalDataError(f"evaluation.{self.name}: held-out row {mine[0]}: {e}") from None
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            hidden = model.final_hidden(batch)
            out = model.loss_from_hidden(hidden, batch["labels"], batch["sample_ids"])
            labelled, targets, _ = select_labelled(hidden, batch["labels"])
            logits = gather_last_dim(model.head(labelled).float())
            totals[0] += out.token_losses.double().sum()
            totals[1] += (logits.argmax(-1) == targets).sum()
            totals[2] += out.num_tokens
        model.train(was_training)
        loss_sum, correct, count = ctx.all_reduce(totals).tolist()
        tokens = max(1.0, count)
        return EvalResult({"val_loss": loss_sum / tokens, "val_token_accuracy": correct / tokens,
                           "val_tokens": float(count)})

    def _run_pipeline(self, ctx: EvalContext) -> EvalResult:
        """Through the pipeline engine: every data-parallel rank feeds the same number of micro-batches."""
        from megatron_genlip.data.packed_dataset import build_loader

        n = max(1, min(self.num_rows, self.rows.rows_in_epoch(0)) // (self.micro * ctx.dp_world))
        loader = build_loader(self.rows, 0, self.micro, ctx.dp_rank, ctx.dp_world, limit=n)
        loss = float(ctx.pipeline_loss(loader))
        return EvalResult({"val_loss": loss, "val_rows": float(n * self.micro * ctx.dp_world)})
