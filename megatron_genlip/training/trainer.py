"""The training loop on the DeepSpeed engine.

One optimizer step = ``grad_accumulation`` micro-batches per data-parallel rank; DeepSpeed owns data
parallelism, ZeRO, bf16, gradient clipping, the optimizer and the lr schedule's stepping. The trainer owns
the data position (``consumed_samples``), checkpoints with exact resume, guards against non-finite values,
signals, logging and evaluation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import deepspeed
import torch
from megatron.core import parallel_state

from megatron_genlip import compat, platform
from megatron_genlip.batch import pipeline_inputs
from megatron_genlip.config import Config, ConfigError, field_errors, resolve_layout
from megatron_genlip.data.tokenizer import tokenizer_fingerprint
from megatron_genlip.data.packed_dataset import (build_loader, check_data_files, check_rows_match, open_rows,
                                                  open_train_rows)
from megatron_genlip.data.tokenizer import check_vocab_size, load_tokenizer, tokenizer_description
from megatron_genlip.model import recompute
from megatron_genlip.model.genlip import build_model
from megatron_genlip.model.stages import build_pipeline
from megatron_genlip.parallel import comm, rng, state
from megatron_genlip.training import checkpoint as ckpt
from megatron_genlip.training import ckpt_format as fmt
from megatron_genlip.training import reshard
from megatron_genlip.evaluation import EvalContext, build_evaluators, check_layout, due, prefixed
from megatron_genlip.evaluation.data import CaptionedImages
from megatron_genlip.evaluation.validation_loss import pipeline_token_loss
from megatron_genlip.training.best import RISING_EVALS, VAL_LOSS, EvalHistory, resolve_metric
from megatron_genlip.training.contact_sheet import write_eval_sheet
from megatron_genlip.training.distributed import device, init_distributed
from megatron_genlip.training.ds_config import deepspeed_config
from megatron_genlip.training.errors import NonFiniteError, TooManySkips, check_batch
from megatron_genlip.training.lock import lock_output_dir
from megatron_genlip.training.metrics import RunLogger, batch_stats, check_wandb, format_step, memory_gb
from megatron_genlip.training.profiling import StepProfiler, SyncCounter, phase
from megatron_genlip.training.schedule import build_scheduler
from megatron_genlip.training.signals import STOP_SIGNALS, install_stop_handlers


# settings that decide which rows a resumed run reads at its consumed row count (besides the dataset itself)
STREAM_FIELDS = ("data.seq_length", "data.seed", "data.pack_buffer_size", "train.global_batch_size", "data.stage",
                 "data.image_size", "data.min_pixels", "data.max_pixels", "data.max_sample_length",
                 "data.max_aspect_ratio", "data.background", "data.jpeg_draft", "data.train_blend")


def stream_changes(saved: dict, saved_fingerprint, cfg: Config, fingerprint: str) -> list[str]:
    """What differs between a checkpoint's data stream (its resolved config and dataset fingerprint) and this
    run's, one ``field: saved -> now`` each."""
    now, default = cfg.to_dict(), Config().to_dict()  # a field newer than the checkpoint had its default then
    changes = []
    if saved_fingerprint != fingerprint:
        changes.append(f"dataset: {saved_fingerprint} -> {fingerprint} (data.train_data / data.train_blend)")
    for name in STREAM_FIELDS:
        section, key = name.split(".")
        old, new = saved.get(section, {}).get(key, default[section][key]), now[section][key]
        if old != new:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the trainer, which checkpoints before exiting."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.stop_requested = False
        check_wandb(cfg.train.wandb_project)  # before any work: a missing package is a configuration error
        # first: the one platform decision (device, compile, loader, optimizer, library patches); logged by train()
        self.platform = platform.initialize(cfg.train.compile)
        if cfg.train.sync_debug and not self.platform.cuda:
            raise ConfigError("train.sync_debug counts synchronisations of the CUDA stream and needs a GPU; this "
                              "machine has none (set train.sync_debug=false)")
        self.rank, self.world = init_distributed(self.platform)
        self.layout = resolve_layout(cfg, self.world)
        state.ensure_initialized(self.layout.tensor_parallel, self.layout.pipeline_parallel)
        state.check_rank_order(self.layout.tensor_parallel, self.layout.pipeline_parallel)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_world = parallel_state.get_data_parallel_world_size()
        self.device = device(self.platform)
        self.out = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.iteration = 0
        self.consumed_samples = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.samples_seen = 0.0
        self.tokens_seen = 0.0
        self.saved_step: int | None = None  # the step of the last checkpoint this process saved
        # the step's one agreement over all ranks (``_decide``): a non-finite loss anywhere, a stop signal anywhere
        self.step_nonfinite = False
        self.stop_agreed = False
        self._step_counts = {"samples": 0.0, "tokens": 0.0}  # this rank's micro-batches of the current step
        self._batch_checked = False  # the first micro-batch is checked against the packed-batch contract
        self.history = EvalHistory()  # the best metric's evaluations and their checkpoints (training/best.py)
        self.step0: dict = {}  # train.eval_at_start: the initial model's metrics
        self._rising_said = False
        self.lock = lock_output_dir(self.out)  # before anything reads or writes the output directory
        self.resume = ckpt.choose_resume(cfg)  # rank 0 decides: every rank loads the same checkpoint
        # newest checkpoint saved (or resumed from) with no skipped step pending
        self.last_good: Path | None = self.resume.tag_dir if self.resume.tag else None
        self.finished = self._finished_run()
        if self.finished:
            return
        self._build_data()
        self._build_engine()
        self.resumed_from = self._resume()

    # ---------------------------------------------------------------------------------------------
    # set-up

    def _finished_run(self) -> bool:
        """A restart of a run whose output directory holds its final checkpoint has nothing to do."""
        r = self.resume
        return (r.tag is not None and r.source == ckpt.OWN_CHECKPOINTS and not r.state.get("weights_only")
                and r.state.get("iteration", 0) >= self.cfg.train.train_steps)

    def _build_data(self) -> None:
        cfg = self.cfg
        if not cfg.data.train_data and not cfg.data.train_blend:
            raise ConfigError("data.train_data (or data.train_blend) is not set: point it at a dataset built by "
                              "tools/preprocess_data.py")
        with field_errors("tokenizer.path"):
            fp = tokenizer_fingerprint(cfg.tokenizer.kind, cfg.tokenizer.path)
            self.tokenizer = load_tokenizer(cfg.tokenizer.kind, cfg.tokenizer.path)
        check_vocab_size(self.tokenizer, cfg.model.vocab_size, tokenizer_description(cfg.tokenizer))
        d = cfg.data
        with field_errors("data.train_blend" if d.train_blend else "data.train_data"):
            self.train_rows = open_train_rows(d, fp)
            # every part's files and sizes, checked by rank 0 alone (100,000 parts on a parallel file system are
            # one process's stats, not every rank's), its verdict on every rank
            ckpt.rank0_decides(lambda: check_data_files(self.train_rows))
        check_rows_match(self.train_rows, cfg)
        self._index_build = dict(build=d.build_missing_pack_index,
                                 workers=d.pack_index_workers or min(8, os.cpu_count() or 1),
                                 log=print if self.rank == 0 else (lambda *_: None))
        self.valid = self.valid_rows = None
        if d.valid_data:
            with field_errors("data.valid_data"):
                self.valid_rows = open_rows(d.valid_data, d, fp)
                ckpt.rank0_decides(lambda: check_data_files(self.valid_rows))
                check_rows_match(self.valid_rows, cfg)
                self.valid_rows.ensure(epochs=1, **self._index_build)  # a sample longer than a row stops here
            self.valid = self.valid_rows.dataset
        self._build_evaluators()

    def _build_evaluators(self) -> None:
        """The config's evaluators (default: ``val`` and ``captions`` on data.valid_data), checked against the
        layout; those without data of their own get the held-out set opened above; the metric ``best.json``
        follows. Their data is read in :meth:`train`, before the first step."""
        cfg, pp = self.cfg, self.layout.pipeline_parallel
        self.evaluators = build_evaluators(cfg, self.tokenizer, cfg.evaluation)
        self.eval_note = None
        if not cfg.evaluation and pp > 1:  # the default list: captioning needs the whole model on one rank
            left = [ev.name for ev in self.evaluators if ev.needs_full_model]
            self.evaluators = [ev for ev in self.evaluators if not ev.needs_full_model]
            if left:
                self.eval_note = (f"evaluation: the default {', '.join(left)} evaluator is left out at "
                                  f"parallel.pipeline_parallel={pp} (it needs the whole model on one rank): run "
                                  "tools/evaluate.py on a checkpoint for it")
        check_layout(self.evaluators, pp)
        for ev in self.evaluators:  # DeepSpeed's pipeline keeps the activation shapes of the first batch it sends
            if pp > 1 and ev.type_name == "validation_loss" and ev.micro != cfg.train.micro_batch_size:
                raise ConfigError(f"evaluation.{ev.name}.options.micro_batch_size ({ev.micro}) must equal "
                                  f"train.micro_batch_size ({cfg.train.micro_batch_size}) with "
                                  f"parallel.pipeline_parallel={pp}: the pipeline stages exchange fixed shapes")
        for ev in self.evaluators:
            if ev.spec.data is None and ev.type_name == "validation_loss" and self.valid_rows is not None:
                ev.rows = self.valid_rows
            if ev.spec.data is None and ev.type_name == "captioning" and self.valid is not None:
                ev.data = CaptionedImages.wrap(self.valid)
        key, mode, self.best_metric = resolve_metric(cfg, self.evaluators)
        self.history = EvalHistory(key=key or VAL_LOSS, mode=mode)
        self.best_key = key

    def _ensure_pack_index(self) -> None:
        """The pack index covers every row the rest of the run reads (from the resumed position), plus what the
        loader prefetches past the end. Built here by one process under a lock, or ahead by
        tools/build_pack_index.py; never inside a DataLoader worker. A sample longer than data.seq_length fails
        the build, naming the field."""
        t, d = self.cfg.train, self.cfg.data
        prefetched = t.global_batch_size * (d.prefetch_factor * max(1, d.num_workers) + 1)
        needed = self.consumed_samples + (t.train_steps - self.iteration) * t.global_batch_size + prefetched
        with field_errors("data.seq_length"):
            self.train_rows.ensure(rows=needed, **self._index_build)

    def _build_engine(self) -> None:
        cfg, tp, pp = self.cfg, self.layout.tensor_parallel, self.layout.pipeline_parallel
        sp = cfg.parallel.sequence_parallel
        if pp > 1:  # DeepSpeed's pipeline engine; its own grid equals megatron-core's groups (checked above)
            model = build_pipeline(cfg.model, tp, pp, cfg.train.seed, cfg.train.activation_checkpointing,
                                   sequence_parallel=sp)
        else:
            model = build_model(cfg.model, tp, seed=cfg.train.seed, sequence_parallel=sp)
            model.activation_checkpointing = cfg.train.activation_checkpointing
        self.compile_note = compile_blocks(model, self.platform.compile, cfg.parallel.zero_stage, cfg.model.backend)
        # random streams (parallel/rng.py): DropPath's stream is identical over TP, different per DP rank;
        # megatron-core's tracker gets the per-TP-rank "model-parallel-rng" stream
        rng.model_parallel_seed(cfg.train.seed, self.dp_rank)
        self.ds_config = deepspeed_config(cfg, self.layout, self.platform, load_universal=self.resume.universal)
        if sp and pp > 1:
            # stages exchange sequence slices that differ per TP rank; DeepSpeed's default splits the activation
            # over the TP group and reassembles it from every rank's part, assuming it is replicated (with SP
            # that trains silently wrong: measured loss 6.1081 vs 6.1032 at step 1)
            self.ds_config["pipeline"] = dict(self.ds_config.get("pipeline", {}), pipe_partitioned=False,
                                              grad_partitioned=False)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=self.ds_config, lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
            mpu=state.MegatronMPU() if tp > 1 and pp == 1 else None,
        )
        if sp and pp > 1 and (self.engine.is_pipe_partitioned or self.engine.is_grad_partitioned):
            raise RuntimeError("parallel.sequence_parallel with parallel.pipeline_parallel > 1 needs DeepSpeed's "
                               "pipeline.pipe_partitioned and pipeline.grad_partitioned off")
        self.pipelined = pp > 1

    def _client_state(self) -> dict:
        """Trainer state saved with every checkpoint, under its own key (DeepSpeed's own top-level keys such
        as ``skipped_steps`` would otherwise collide and be dropped on load)."""
        return {"genlip": {
            "iteration": self.iteration,
            "consumed_samples": self.consumed_samples,
            "skipped_steps": self.skipped_steps,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "config": self.cfg.to_dict(),
            "data_fingerprint": self.train_rows.fingerprint(),
            "layout": dataclasses.asdict(self.layout),
            "zero_stage": self.cfg.parallel.zero_stage,
        }}

    def _resume(self) -> str:
        """Load the checkpoint rank 0 chose (:func:`ckpt.choose_resume`), or start from scratch; say which and
        why newer checkpoints were passed over.

        The checkpoint's layout is checked before DeepSpeed touches it (DeepSpeed fails obscurely, or loads
        wrongly, at another layout); a resharded (universal) checkpoint loads at any layout, a weights-only one
        starts a fresh run (step 0, new optimizer) from its weights."""
        r = self.resume
        said = "".join(f"checkpoint note: {n}\n" for n in r.notes)
        if r.tag is None:
            return said + "started from scratch (no checkpoint in the output directory or train.load)"
        directory, tag, what, client = r.directory, r.tag, r.source, r.state
        current = reshard.run_layout(self.layout, self.cfg.parallel.zero_stage)
        problem = (reshard.universal_target_problem(current["zero_stage"], current["tensor_parallel"]) if r.universal
                   else reshard.layout_mismatch(client, current, directory, tag))
        if problem:
            raise ConfigError(problem)
        if client.get("weights_only"):
            if (directory / tag / fmt.WEIGHTS_ONLY_MARKER).is_file():  # full weights from convert_checkpoint.py
                from megatron_genlip.hf.convert import load_weights_only  # transformers: imported only here

                load_weights_only(self.engine, directory / tag, self.cfg.model)
            else:
                ckpt.load_checkpoint(self.engine, directory, tag, weights_only=True)
            return said + f"initialised from the weights of {directory / tag} ({what}); step 0, fresh optimizer"
        changes = stream_changes(client.get("config", {}), client.get("data_fingerprint"), self.cfg,
                                 self.train_rows.fingerprint())
        if changes and not self.cfg.data.allow_new_stream:
            raise ConfigError(
                f"checkpoint {directory / tag} read another data stream than this run would: {'; '.join(changes)}. "
                "Resuming would not continue the same stream: restore those settings, or set "
                "data.allow_new_stream=true to continue from its consumed row count on the new stream, or use a new "
                "train.output_dir to start a new run")
        client = ckpt.load_checkpoint(self.engine, directory, tag, manifest=r.manifest).get("genlip")
        for key in ("iteration", "consumed_samples", "skipped_steps", "samples_seen", "tokens_seen"):
            setattr(self, key, client[key])
        if what == ckpt.OWN_CHECKPOINTS:  # this run's evaluations up to here, and its best checkpoint
            self.history = EvalHistory.load(self.ckpt_dir, self.iteration, self.history.key, self.history.mode)
        how = f" (resharded from {reshard.describe(client['resharded']['source_layout'])})" if r.universal else ""
        if changes:
            how += (f"; data.allow_new_stream=true: continuing at consumed row {self.consumed_samples} of a new data "
                    f"stream ({'; '.join(changes)})")
        return said + f"resumed from {directory / tag} ({what}) at step {self.iteration}{how}"

    # ---------------------------------------------------------------------------------------------
    # the loop

    def train(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        rank0 = self.rank == 0
        if self.finished:
            return self._finished_summary()
        if rank0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
        self._ensure_pack_index()  # may build epochs: still start-up, where a stop signal ends the process
        efficiency = self.train_rows.efficiency(0)
        loader = build_loader(self.train_rows, self.consumed_samples, t.micro_batch_size, self.dp_rank,
                              self.dp_world, cfg.data.num_workers, worker_init_fn=_ignore_stop_signals,
                              prefetch_factor=cfg.data.prefetch_factor, pin_memory=self.platform.pin_memory)
        batches = iter(loader)
        log = None
        try:
            install_stop_handlers(self)  # until here a stop signal ends start-up at once (signals.py)
            show_bar = t.progress_bar == "always" or (t.progress_bar == "auto" and sys.stderr.isatty())
            log = RunLogger(self.out, rank0, t.tensorboard, t.train_steps if show_bar else None, self.iteration,
                            wandb={"project": t.wandb_project, "mode": t.wandb_mode, "config": cfg.to_dict()})
            log.print(self.platform.describe() + f"; {self.compile_note}")
            log.record("platform", self.iteration, dataclasses.asdict(self.platform))
            log.print(f"{self.resumed_from}; layout {dataclasses.asdict(self.layout)}; "
                      f"packing efficiency (epoch 0) {100 * efficiency:.2f}%")
            if self.eval_note:
                log.print(self.eval_note)
            ctx = self._eval_context()
            for ev in self.evaluators:  # every evaluator reads its data now: bad data stops the run before step 1
                ev.prepare(ctx)
            if t.eval_at_start and self.iteration == 0 and self.evaluators:
                self.step0 = self.evaluate(log, self.evaluators)
            return self._loop(batches, log)
        finally:  # workers ignore SIGTERM (the trainer owns it), so they are stopped here, never signalled
            compat.stop_loader_workers(batches)
            if log is not None:
                log.close()

    def _loop(self, batches, log: RunLogger) -> dict:
        t = self.cfg.train
        self.engine.train()
        window = _Window()
        last_eval = {}
        stopped_by_signal = False
        profiler = StepProfiler(t.profile_steps, self.out, self.rank, self.device.type == "cuda", log.print)
        syncs = SyncCounter(t.sync_debug)
        while self.iteration < t.train_steps:
            profiler.before_step(self.iteration + 1)
            with syncs.step():
                self._train_step(batches, window)
            window.syncs = syncs.last if t.sync_debug else None
            log.advance()
            stop = self.stop_agreed  # agreed inside the step, with the non-finite check (one reduction)
            last = self.iteration == t.train_steps
            save = stop or (last and t.save_final) or self.iteration % t.save_interval == 0
            if save or self.iteration % t.log_interval == 0:
                log.print(format_step(self.iteration, t.train_steps, window.summarise(self, log)))
            self._check_skips()
            if save:
                self.save(log)
            if stop:
                profiler.after_step(self.iteration, stopping=True)
                log.print(f"stop signal received: checkpoint saved at step {self.iteration}; exiting")
                stopped_by_signal = True
                break
            due_now = [ev for ev in self.evaluators if due(ev, self.iteration, t.train_steps)]
            if due_now:
                last_eval = {**last_eval, **self.evaluate(log, due_now)}
                if self.best_key is not None and self.best_key in last_eval and any(
                        self.best_metric.startswith(ev.name + "/") for ev in due_now):
                    self._track_best(last_eval[self.best_key], log)
            profiler.after_step(self.iteration)
        return self._summary(window, last_eval, stopped_by_signal)

    def _next_batch(self, batches, window: "_Window", rows: list) -> dict:
        """The next micro-batch on the device, counted in the window; poisoned if fault injection asks."""
        start = time.perf_counter()
        with phase("data"):
            batch = next(batches)
        window.data_wait += time.perf_counter() - start
        rows += batch.pop("row_index").tolist()
        if not self._batch_checked:  # on the host, before the device sees it
            check_batch(batch, f"the first training micro-batch (packed rows {rows})", self.cfg.data.seq_length,
                        self.cfg.model.patch_size)
            self._batch_checked = True
        for k, v in batch_stats(batch, self.cfg.model).items():
            window.stats[k] += v
            if k in self._step_counts:
                self._step_counts[k] += v
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        if self.iteration + 1 in self.cfg.train.inject_nan_steps:
            batch["patches"] = batch["patches"] * float("nan")
        return batch

    def _pipeline_step(self, batches, window: "_Window") -> tuple[torch.Tensor, list]:
        """One optimizer step through DeepSpeed's pipeline schedule (it pulls grad_accumulation micro-batches
        on the first and last stage)."""
        rows: list = []
        feed = (pipeline_inputs(self._next_batch(batches, window, rows)) for _ in range(self.layout.grad_accumulation))
        with phase("pipeline_step"):
            loss = self.engine.train_batch(data_iter=feed)  # mean over micro-batches and DP, on every stage
        losses = _loss_terms(loss.to(self.device))
        self._decide(losses, f"packed rows of this rank's micro-batches: {rows}")
        return losses, rows

    def _train_step(self, batches, window: "_Window") -> None:
        t = self.cfg.train
        self._step_counts = dict.fromkeys(self._step_counts, 0.0)
        if self.pipelined:
            step_losses, rows = self._pipeline_step(batches, window)
        else:
            step_losses, rows = self._data_parallel_step(batches, window)
        self.iteration += 1
        self.consumed_samples += t.global_batch_size
        # the norm stays where DeepSpeed keeps it (a device tensor under ZeRO): read on the host only by the log
        # line, or here under train.nan_policy=stop. None: not computed (train.clip_grad=0 with ZeRO-0 fp32)
        reported = self.engine.get_global_grad_norm()
        applied = self.engine.was_step_applied()
        skipped = not applied or self.step_nonfinite
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            if applied:
                raise NonFiniteError(f"step {self.iteration}: a non-finite loss reached an applied optimizer step")
            self.skipped_steps += 1
        elif reported is not None and t.nan_policy == "stop" and not math.isfinite(float(reported)):
            raise NonFiniteError(f"non-finite gradient norm at step {self.iteration}")
        window.add_step(step_losses, reported, self.engine.get_lr()[0])

    def _data_parallel_step(self, batches, window: "_Window") -> tuple[torch.Tensor, list]:
        """``grad_accumulation`` micro-batches: forward, backward, DeepSpeed's step. Nothing here waits for the
        device: the losses and their non-finite count accumulate on it, and the one agreement of the step
        (:meth:`_decide`) comes after the last backward, before the optimizer is applied."""
        step_losses = torch.zeros(3, dtype=torch.float64, device=self.device)  # finite loss sum, count, non-finite
        rows: list = []
        for micro in range(self.layout.grad_accumulation):
            batch = self._next_batch(batches, window, rows)
            with phase("forward"):
                out = self.engine(batch)
            step_losses += _loss_terms(out.loss.detach())
            with phase("backward"):
                self.engine.backward(out.loss)
            if micro == self.layout.grad_accumulation - 1:
                self._decide(step_losses, f"packed rows of this rank's micro-batch: {rows}; consumed_samples before "
                                          f"the step: {self.consumed_samples}")
            with phase("optimizer"):
                self.engine.step()
        return step_losses, rows

    def _decide(self, step_losses: torch.Tensor, where: str) -> None:
        """The step's one reduction over all ranks and its one wait for the device: did any rank see a
        non-finite loss, did any rank get a stop signal. Under ``train.nan_policy=stop`` a non-finite loss stops
        the run here, before the optimizer applies the step (pipeline: after, as DeepSpeed's schedule owns it)."""
        with phase("agree"):
            # the step's samples and tokens, counted by every rank that read this step's rows: TP peers (and the
            # first and last pipeline stage) read the same rows, so the world's sum holds each DP rank's counts
            # equally often; ``counted`` says how often. The host values travel in one copy that does not wait for
            # the device (pinned memory on CUDA; an item-by-item store into a device tensor would wait each time)
            counts = self._step_counts
            host = torch.tensor([1.0 if self.stop_requested else 0.0, counts["samples"], counts["tokens"],
                                 1.0 if counts["samples"] > 0 else 0.0], dtype=torch.float64,
                                pin_memory=self.platform.pin_memory)
            flags = torch.cat([step_losses[2:3], host.to(step_losses.device, non_blocking=True)])
            nonfinite, stop, samples, tokens, counted = comm.all_reduce(flags).tolist()
        self.step_nonfinite, self.stop_agreed = nonfinite > 0, stop > 0
        if counted > 0:  # the checkpointed counters advance with the step, whatever is logged
            self.samples_seen += samples * self.dp_world / counted
            self.tokens_seen += tokens * self.dp_world / counted
        if self.step_nonfinite and self.cfg.train.nan_policy == "stop":
            raise NonFiniteError(f"non-finite loss at step {self.iteration + 1} (train.nan_policy=stop); {where}")

    # ---------------------------------------------------------------------------------------------
    # checkpoints and evaluation

    def _check_skips(self) -> None:
        """Stop a run whose last ``train.max_consecutive_skips`` steps were all skipped: it has diverged (or its
        data is bad) and would otherwise go on skipping, and saving, to the end."""
        limit = self.cfg.train.max_consecutive_skips
        if limit <= 0 or self.consecutive_skips < limit:
            return
        first = self.iteration - self.consecutive_skips + 1
        message = (f"steps {first}-{self.iteration} were all skipped (non-finite loss or gradient norm; "
                   f"train.max_consecutive_skips={limit}): the run has diverged or its data is bad. ")
        if self.last_good is None:
            raise TooManySkips(message + "No checkpoint was saved before the skips began: lower train.lr and start "
                                         "again")
        newer = [t for t in fmt.list_tags(self.ckpt_dir) if fmt.step_of(t) > fmt.step_of(self.last_good.name)]
        raise TooManySkips(message + f"The last good checkpoint is {self.last_good}"
                           + (f"; to resume from it, move the newer {', '.join(newer)} out of {self.ckpt_dir}" if newer
                              else "") + ", and lower train.lr or check the data it reads next")

    def save(self, log: RunLogger) -> None:
        """Save a checkpoint; the newest one saved while no skipped step is pending stays protected from
        retention (it is the one to go back to if the run diverges)."""
        protect = (self.last_good.name,) if self.last_good and self.last_good.parent == self.ckpt_dir else ()
        kept = self.history.best_checkpointed() if self.cfg.train.keep_best else None
        if kept is not None:
            protect += (kept["checkpoint"],)
        tag = ckpt.save_checkpoint(self.engine, self.ckpt_dir, self.iteration, self._client_state(),
                                   self.cfg.train.keep_last, protect=protect)
        self.saved_step = self.iteration
        if self.consecutive_skips == 0:
            self.last_good = self.ckpt_dir / tag
        log.print(f"saved checkpoint {self.ckpt_dir / tag}")
        log.record("checkpoint", self.iteration, {"tag": tag})

    def _track_best(self, value: float, log: RunLogger) -> None:
        """Record an evaluation of the best metric; with ``train.keep_best`` a new best gets a checkpoint (saved now
        unless this step's was just saved), which retention then keeps until a better one replaces it. The note on
        a worsening metric is printed at the evaluation where it first holds."""
        new_best = comm.any_rank(self.history.is_new_best(value))  # the same value on every rank; agreed anyway
        tag = fmt.tag_for(self.iteration) if self.saved_step == self.iteration else None
        if new_best and self.cfg.train.keep_best and tag is None:
            self.save(log)
            tag = fmt.tag_for(self.iteration)
        self.history.add(self.iteration, value, tag)
        if self.rank == 0:
            self.history.save(self.ckpt_dir, self.cfg.train.keep_best)
        if new_best:
            where = f": checkpoint {tag} kept (train.keep_best)" if self.cfg.train.keep_best else ""
            what = "validation loss" if self.history.key == VAL_LOSS else self.history.key
            log.print(f"new best {what} {value:.4f} at step {self.iteration}{where}")
        note = self.history.rising_note(self.cfg.train.keep_best)
        if note and not self._rising_said:
            log.print(f"note: {note}")
        self._rising_said = note is not None

    def _eval_model(self):
        """A model with full parameters: the engine's module, or a gathered copy under ZeRO-3."""
        if self.cfg.parallel.zero_stage != 3:
            return self.engine.module
        copy = build_model(self.cfg.model, self.cfg.parallel.tensor_parallel, seed=0).to(self.device)
        params = dict(self.engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
            copy.load_state_dict({k: v.detach().clone() for k, v in params.items()}, strict=False)
        return copy.to(next(iter(params.values())).dtype)

    def _eval_context(self) -> EvalContext:
        return EvalContext(device=self.device, dp_rank=self.dp_rank, dp_world=self.dp_world,
                           dp_group=parallel_state.get_data_parallel_group(), tokenizer=self.tokenizer,
                           prompt=self.cfg.tokenizer.prompt, step=self.iteration, seed=self.cfg.train.seed,
                           pipeline_loss=self._pipeline_loss if self.pipelined else None)

    def _pipeline_loss(self, loader) -> float:
        """The held-out loss of ``loader``'s packed batches through the pipeline schedule (validation_loss under
        PP), token-weighted over micro-batches and ranks as one rank's (evaluation/validation_loss.py)."""
        return pipeline_token_loss(self.engine, self.device, loader)

    def evaluate(self, log: RunLogger, evaluators: list) -> dict:
        """Run ``evaluators`` (collective over every rank) and log their metrics as ``NAME/METRIC`` (console line,
        JSONL, TensorBoard, W&B); the first validation_loss and captioning evaluators' metrics also keep their
        historical names (``val_loss``, ``caption_exact_match``, ...). The first captioning evaluator's captions
        go on the contact sheet. Returns the logged record (plus ``caption_examples``)."""
        start = time.perf_counter()
        ctx = self._eval_context()
        full = any(ev.needs_full_model or not self.pipelined for ev in evaluators)
        model = self._eval_model() if full else None
        record: dict = {}
        results = {}
        for ev in evaluators:
            began = time.perf_counter()
            results[ev.name] = res = ev.run(model if (ev.needs_full_model or not self.pipelined) else None, ctx)
            record.update(prefixed(ev.name, res.metrics))
            record[f"{ev.name}/seconds"] = time.perf_counter() - began
        self.engine.train()
        record = {**_historical_names(evaluators, results), **record}
        record["eval_seconds"] = time.perf_counter() - start
        parts = [f"{ev.name}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in results[ev.name].metrics.items())
                 for ev in evaluators]
        log.print(f"eval step {self.iteration} | " + " | ".join(parts) + f" | {record['eval_seconds']:.1f} s")
        examples = record.pop("caption_examples", None)
        log.record("eval", self.iteration, record)
        captioner = next((ev for ev in evaluators if ev.type_name == "captioning"), None)
        if captioner is not None:
            write_eval_sheet(self.out / "eval", self.iteration, record, results[captioner.name].records,
                             _SheetImages(captioner.data), log)
        return record if examples is None else {**record, "caption_examples": examples}

    def _summary(self, window: "_Window", last_eval: dict, stopped: bool) -> dict:
        s = {
            "steps": self.iteration,
            "stopped_by_signal": stopped,
            "final_train_loss": window.last_loss,
            "skipped_steps": self.skipped_steps,
            "consumed_rows": self.consumed_samples,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "output_dir": str(self.out),
            "checkpoint": str(self.ckpt_dir / (fmt.read_latest(self.ckpt_dir).tag or "-")),
            "train_log": str(self.out / "logs" / "train.jsonl"),
            "tensorboard": str(self.out / "tensorboard"),
            "resumed_from": self.resumed_from,
        }
        s.update(last_eval)
        if self.step0:  # train.eval_at_start: the initial model's metrics, beside the last evaluation's
            s["step0"] = {f"{ev.name}/{k}": self.step0[f"{ev.name}/{k}"] for ev in self.evaluators
                          for k in ev.metric_keys if f"{ev.name}/{k}" in self.step0}
        if self.history.evals:
            best = self.history.best()
            key = self.history.key
            s["best_metric"] = self.best_metric
            s["best_val_loss" if key == VAL_LOSS else "best_value"] = best[key] if best else None
            s["best_val_step"] = best["step"] if best else None
            # train.keep_best: the kept checkpoint; otherwise the best evaluation's, while retention has left it
            kept = self.history.best_checkpointed() if self.cfg.train.keep_best else best
            s["best_checkpoint"] = (str(self.ckpt_dir / kept["checkpoint"]) if kept and kept["checkpoint"]
                                    and (self.ckpt_dir / kept["checkpoint"]).is_dir() else None)
            s["val_loss_rising"] = self.history.rising_note(self.cfg.train.keep_best)
            s["val_loss_rising_evaluations"] = RISING_EVALS
            s["first_evaluation_best"] = self.history.first_is_best_note()
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(s, indent=1))
        return s


    def _finished_summary(self) -> dict:
        """A restart of a finished run: its summary.json (kept as it is) and a flag saying so."""
        path = self.out / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = {"steps": self.resume.state.get("iteration"), "output_dir": str(self.out)}
        return dict(summary, already_finished=True, checkpoint=str(self.resume.tag_dir), summary_file=str(path))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _historical_names(evaluators: list, results: dict) -> dict:
    """The first validation_loss and captioning evaluators' metrics under the names logs, summaries and tools have
    always used (``val_loss``, ``val_token_accuracy``, ``caption_exact_match``, ``caption_token_accuracy``,
    ``caption_images``, ``caption_examples``)."""
    out = {}
    val = next((ev for ev in evaluators if ev.type_name == "validation_loss"), None)
    if val is not None:
        out.update({k: v for k, v in results[val.name].metrics.items() if k.startswith("val_")})
    cap = next((ev for ev in evaluators if ev.type_name == "captioning"), None)
    if cap is not None:
        m = results[cap.name].metrics
        out.update(caption_exact_match=m["exact_match"], caption_token_accuracy=m["token_accuracy"],
                   caption_images=int(m["images"]))
        out["caption_examples"] = [{k: r[k] for k in ("index", "reference", "generated")}
                                   for r in results[cap.name].records[:4]]
    return out


def compile_blocks(model, compile: bool, zero_stage: int, backend: str = "local") -> str:
    """Compile every transformer block of ``model`` (``train.compile`` on CUDA: model/recompute.py); returns what
    the start-up line says about it. ZeRO-3 gathers each block's parameters in module hooks, which a compiled
    forward would trace into its graph, and Transformer Engine's layers keep their own FP8 state and autocast
    region: their blocks run uncompiled, and the line says so."""
    if not compile:
        return "transformer blocks uncompiled"
    if backend == "te":
        return "transformer blocks uncompiled with model.backend=te (only the attention kernels are compiled)"
    if zero_stage == 3:
        return ("transformer blocks uncompiled under ZeRO-3 (its parameter gathering hooks run around each block's "
                "forward; only the attention kernels are compiled)")
    blocks = recompute.blocks_of(model)
    for block in blocks:
        recompute.compile_block(block)
    return f"{len(blocks)} transformer blocks compiled (torch.compile, static shapes)"


class _SheetImages:
    """A captioning evaluator's images by index, as the contact sheet reads them (``.patches``, ``.grid``)."""

    def __init__(self, data):
        self.data = data

    def __getitem__(self, i):
        patches, grid, _ = self.data.get(i)
        return _Sample(patches, grid)


@dataclasses.dataclass
class _Sample:
    patches: torch.Tensor
    grid: tuple


def _loss_terms(loss: torch.Tensor) -> torch.Tensor:
    """(the loss if finite else 0, 1 if finite, 1 if not) in float64 on the loss's device, without waiting for it."""
    loss = loss.detach().reshape(()).double()
    finite = torch.isfinite(loss)
    return torch.stack([torch.where(finite, loss, torch.zeros_like(loss)), finite.double(), (~finite).double()])


class _Window:
    """Accumulates what happened since the last log line."""

    def __init__(self):
        self.reset()
        self.last_loss = float("nan")

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.steps = 0
        self.loss = torch.zeros(3, dtype=torch.float64)
        self.stats = {"samples": 0.0, "tokens": 0.0, "slots": 0.0, "flops": 0.0}
        self.grad_norm = float("nan")
        self.lr = 0.0
        self.syncs = None  # train.sync_debug: host synchronisations of the last step

    def add_step(self, losses: torch.Tensor, grad_norm, lr: float) -> None:
        """``losses`` on the device (no wait); ``grad_norm`` as DeepSpeed reports it (a device tensor, a float or
        None), read when the window is logged."""
        self.loss = losses.clone() if self.steps == 0 else self.loss + losses  # stays on the device
        self.grad_norm, self.lr = grad_norm, lr
        self.steps += 1

    def summarise(self, trainer: Trainer, log: RunLogger) -> dict:
        """All-reduce the window over ranks, log it, reset. Loss = the optimised objective: the mean over
        micro-batches and data-parallel ranks of each micro-batch's token-mean loss (GENLIP_SPEC.md §2.9)."""
        host = torch.tensor([self.stats["samples"], self.stats["tokens"], self.stats["slots"], self.stats["flops"],
                             self.data_wait], dtype=torch.float64)
        # the device's loss sums and the host's counts in one reduction on the device; TP peers share the rows
        totals = torch.cat([self.loss[:2], host.to(self.loss.device)])
        totals = comm.all_reduce(totals, group=parallel_state.get_data_parallel_group()).cpu()
        elapsed = time.perf_counter() - self.start
        world = trainer.world
        loss = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
        self.last_loss = loss
        tflops = float(totals[5]) / elapsed / world / 1e12
        m = {
            "loss": loss, "lr": self.lr, "grad_norm": float("nan") if self.grad_norm is None else float(self.grad_norm),
            "skipped_steps": trainer.skipped_steps,
            "samples_per_s": float(totals[2]) / elapsed, "tokens_per_s": float(totals[3]) / elapsed,
            "rows_per_s": self.steps * trainer.cfg.train.global_batch_size / elapsed,
            "tflops_per_device": tflops, "mfu": tflops / trainer.cfg.train.peak_tflops,
            "packing_efficiency": float(totals[3] / totals[4]) if totals[4] > 0 else 0.0,
            "data_wait_fraction": float(totals[6]) / trainer.dp_world / elapsed, "memory_gb": memory_gb(),
            "consumed_samples": trainer.consumed_samples, "s_per_step": elapsed / max(1, self.steps),
        }
        if self.syncs is not None:
            m["syncs_per_step"] = self.syncs
        # this window's step time (its checkpoint saves and evaluations included) times the steps left
        m["eta_s"] = m["s_per_step"] * (trainer.cfg.train.train_steps - trainer.iteration)
        log.record("train", trainer.iteration, m)
        self.reset()
        return m
