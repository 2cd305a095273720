"""Per-GPU memory plan of a training layout: model states by ZeRO stage, activations from the model's code paths.

``estimate_memory(cfg)`` returns a :class:`MemoryPlan` of the busiest pipeline stage (the first stage holds the most
in-flight micro-batches, the last the LM head; the larger total is reported). Every number is bytes on one GPU.

Model states (DeepSpeed 0.19.8 as installed; read in ``runtime/engine.py`` ``_do_optimizer_sanity_check`` and
``runtime/zero/stage_1_and_2.py`` / ``stage3.py``; measured on CPU by ``tests/test_memory_plan.py``). N = parameters
of the stage on this rank (tensor-parallel shards), DP = data-parallel size, a_p = 2 (bf16) or 4 (fp32):

=========  ===============  ================  ==============  ===============  =====================================
ZeRO       parameters       gradients         fp32 master     Adam m, v        transient in the optimizer step
=========  ===============  ================  ==============  ===============  =====================================
0          a_p N            a_p N             4 N (bf16)      8 N              bf16: fp32 gradient copy 4 N
1          a_p N            a_p N / DP        4 N / DP        8 N / DP         fp32 gradient partition 4 N / DP
                            (after reduction) + one reduce bucket (two under    (+ flattened a_p N / DP)
                            PP) + the full a_p N at the end of backward (``gradient_reduction``)
2          a_p N            a_p N / DP +      4 N / DP        8 N / DP         as ZeRO-1
                            reduce buckets (allocated during backward)
3          a_p N / DP (+    a_p N / DP +      4 N / DP        8 N / DP         as ZeRO-1
           persistent)      reduce buckets (kept)
=========  ===============  ================  ==============  ===============  =====================================

DeepSpeed's bf16 keeps gradients in bf16 (``grad_accum_dtype`` defaults to the model dtype, so ZeRO-1 uses
DeepSpeedZeroOptimizer, not the fp32-accumulating BF16_Optimizer). ZeRO >= 1 keeps its own fp32 partition of the
weights even in fp32 runs (a clone, measured); only fp32 ZeRO-0 updates the parameters themselves. ZeRO-2/3 allocate their reduce buckets (``reduce_bucket_size`` elements, the
platform's 5e8, twice when ``overlap_comm`` is on, as on CUDA) in the gradient dtype. ZeRO-3 keeps parameters of at
most ``param_persistence_threshold`` (1e5) elements whole on every rank and gathers the others module by module
(the largest module plus one prefetch bucket of 5e7 elements are counted).

Activations: bytes autograd saves for backward, counted tensor by tensor from the forward code of
``model/genlip.py``, ``model/layers.py``, ``model/attention.py`` and ``model/stages.py`` (see
:func:`layer_activation_bytes`); a tensor saved by several ops (LN1's output, read by q, gate, k and v) once.
``tests/test_memory_plan.py`` checks the per-layer count against autograd's saved-tensor hooks on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_genlip.config import CHECKPOINTING_MODES, Config, checkpointing_mode
from megatron_genlip.model.attention import fa2_head_dim, segment_capacity
from megatron_genlip.parallel.sharding import partition_dim

GIB = 1024**3
BUCKET_ELEMENTS = int(5e8)  # platform.BUCKET_ELEMENTS: ZeRO reduce / all-gather bucket (DeepSpeed's default)
ZERO3_PERSISTENCE_THRESHOLD = int(1e5)  # DeepSpeed stage3 param_persistence_threshold default
ZERO3_PREFETCH_ELEMENTS = int(5e7)  # DeepSpeed stage3 prefetch_bucket_size default
FLEX_BLOCK = 128  # attention.BLOCK_SIZE
# average sample of --dry-run (entry.DRY_RUN_SAMPLE): (image, text, labelled) tokens
AVERAGE_SAMPLE = {1: (196, 74, 72), 2: (900, 300, 290)}
# keys whose bytes live in host memory, not on the GPU (listed, never added to the GPU total)
HOST_COMPONENTS = ("loader_pinned",)
# order of the table
ORDER = ("parameters", "gradients", "gradient_buckets", "optimizer_states", "master_weights",
         "zero3_gathered_parameters", "gradient_reduction", "optimizer_step_transient", "activations",
         "attention_workspace", "lm_head", "pipeline_in_flight", "backward_transient", "fp8_weight_cache", "batch", "loader_pinned")
DESCRIPTION = {
    "parameters": "model parameters on this rank",
    "gradients": "gradients (ZeRO >= 1: this rank's partition)",
    "gradient_buckets": "ZeRO reduce bucket(s)",
    "gradient_reduction": "ZeRO-1 full gradients awaiting reduction",
    "optimizer_states": "AdamW m and v (fp32)",
    "master_weights": "fp32 master weights (bf16 runs)",
    "zero3_gathered_parameters": "ZeRO-3 gathered module + prefetch",
    "optimizer_step_transient": "fp32 gradient partition in the step",
    "activations": "saved activations, one micro-batch",
    "attention_workspace": "attention masks / kernel buffers",
    "lm_head": "LM head + loss over labelled positions",
    "pipeline_in_flight": "other in-flight pipeline micro-batches",
    "backward_transient": "one layer's gradients in backward",
    "fp8_weight_cache": "FP8 weight copies kept for backward",
    "batch": "the micro-batch on the GPU",
    "loader_pinned": "DataLoader pinned buffers (host RAM)",
}


def _dtype_bytes(precision: str) -> int:
    return 2 if precision == "bf16" else 4


def _tp_group_size() -> int:
    """The global tensor-parallel size megatron-core's layers read when built (0: no groups in this process)."""
    try:
        from megatron.core import parallel_state

        if parallel_state.model_parallel_is_initialized():
            return parallel_state.get_tensor_model_parallel_world_size()
    except (ImportError, AssertionError, RuntimeError):
        pass
    return 0


_META_CACHE: dict = {}


def _meta_parameters(model_cfg) -> tuple[tuple[tuple[str, int], ...], bool]:
    """((name, elements), ...) of the meta model of ``model_cfg`` and whether it came out tensor-parallel split;
    cached (building a 40-layer meta model takes ~1 s and max_micro_batch_size asks ~30 plans)."""
    from megatron_genlip.model.accounting import build_meta_model

    key = (repr(model_cfg), _tp_group_size())
    if key not in _META_CACHE:
        meta = build_meta_model(model_cfg)
        # megatron-core's layers read the global tensor-parallel group when none is given: in a process whose
        # groups exist (a running job, the tests) the meta model is already split
        split = meta.embeddings.weight.shape[0] != model_cfg.vocab_size
        _META_CACHE[key] = (tuple((n, p.numel()) for n, p in meta.named_parameters()), split)
    return _META_CACHE[key]


def stage_parameters(cfg: Config, stage: int) -> list[tuple[str, int, int]]:
    """(name, local elements, module key) of the parameters pipeline stage ``stage`` holds on one TP rank;
    counted on the real model class on the meta device. Blocks are split evenly by count (stages.py)."""
    t, pp = cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel
    per_stage = cfg.model.num_layers // pp
    out = []
    named, split = _meta_parameters(cfg.model)
    if split:
        t = 1
    for name, numel in named:
        top = name.split(".")[0]
        if top == "layers":
            i = int(name.split(".")[1])
            if i // per_stage != stage:
                continue
            module = f"layers.{i}"
        elif top in ("vision_embeddings", "embeddings", "in_proj"):
            if stage != 0:
                continue
            module = top
        else:  # ln_post, proj, lm_head
            if stage != pp - 1:
                continue
            module = top
        out.append((name, numel // t if partition_dim(name) is not None else numel, module))
    return out


@dataclass
class MemoryPlan:
    """Per-GPU memory of one layout (bytes). ``total_bytes`` is the GPU peak: the model states plus the larger of
    the activation phase (forward/backward) and the optimizer-step transient; ``loader_pinned`` (host RAM) is
    listed but not added."""

    components: dict[str, int]
    total_bytes: int
    per_layer_activation_bytes: int
    micro_batch_size: int
    activation_checkpointing: str  # none | selective | full
    world_size: int
    layout: dict = field(default_factory=dict)
    stage: int = 0  # the pipeline stage reported (the one with the larger total)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # sub-parts (blocks, rope tables, lm_head_saved, ...), bytes

    def fits(self, gpu_gib: float) -> bool:
        return self.total_bytes <= gpu_gib * GIB

    def as_dict(self) -> dict:
        return {"components": dict(self.components), "total_bytes": self.total_bytes,
                "total_gib": self.total_bytes / GIB, "per_layer_activation_bytes": self.per_layer_activation_bytes,
                "micro_batch_size": self.micro_batch_size, "activation_checkpointing": self.activation_checkpointing,
                "world_size": self.world_size, "layout": dict(self.layout), "stage": self.stage,
                "notes": list(self.notes), "details": dict(self.details)}

    def table(self, gpu_gib: float = 80.0) -> str:
        lay = self.layout
        head = (f"memory per GPU (stage {self.stage} of PP {lay.get('pipeline_parallel', 1)}; TP "
                f"{lay.get('tensor_parallel', 1)}, DP {lay.get('data_parallel', 1)}, ZeRO-{lay.get('zero_stage', 0)}, "
                f"{lay.get('precision', '')}{', FP8 ' + lay['fp8'] if lay.get('fp8', 'none') != 'none' else ''}; "
                f"micro_batch_size {self.micro_batch_size} x {lay.get('seq_length', 0):,} tokens; activation "
                f"checkpointing {self.activation_checkpointing})")
        lines = [head]
        for key in ORDER:
            if key in self.components and (self.components[key] or key in ("activations", "parameters")):
                v = self.components[key]
                lines.append(f"  {key:<27} {v / GIB:9.2f} GiB  {DESCRIPTION.get(key, '')}")
        lines.append(f"  {'per layer (saved)':<27} {self.per_layer_activation_bytes / GIB:9.3f} GiB")
        verdict = "fits" if self.fits(gpu_gib) else "does NOT fit"
        lines.append(f"  {'total (GPU peak)':<27} {self.total_bytes / GIB:9.2f} GiB  {verdict} in {gpu_gib:g} GB")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def layer_activation_bytes(cfg: Config, rows: int, precision: str | None = None) -> int:
    """Bytes autograd saves in one ``TransformerBlock`` forward (model/layers.py) for ``rows`` packed rows,
    without checkpointing, on one TP rank. T = rows x seq_length tokens; r = 1/TP under sequence parallelism
    (norms, LayerScale, DropPath and residuals run on sequence slices; megatron-core's column-parallel linear saves
    its local, not its all-gathered, input) else 1; a = activation bytes; a_lin = 1 under FP8 (the FP8 linears save
    their FP8-cast input) else a. Saved, op by op:

    * LN1: its input x (T r d a) and mean/rstd (2 T r fp32);
    * q, gate, k, v (column-parallel): their shared input LN1(x) (T r d a_lin), the weights are parameters;
    * RoPE ``x * cos + rotate_half(x) * sin``: only cos/sin (the tables, shared by every layer: not here);
    * attention kernel: q_rot, k_rot, v and its output (4 T d/TP a) plus softmax statistics in fp32:
      FlexAttention logsumexp and max (2 T h/TP), SDPA logsumexp (T h/TP); the output's head-major flatten is a
      view (the kernels return [B, L, h, hd] memory), so the gate's multiply saves no copy;
    * gate: sigmoid output (T d/TP a); o (row-parallel): its input out*sigmoid (T d/TP a_lin);
    * LayerScale ``x * lambda1``: its input, o's output (T r d a); DropPath: a [1, B, 1] mask;
    * LN2: input (T r d a) + stats (2 T r fp32); fc1, gate_fc: shared input (T r d a_lin);
    * SwiGLU: gate_fc and fc1 outputs (SiLU's and the product's inputs, 2 T f/TP a), SiLU output (T f/TP a), fc2's
      input (T f/TP a_lin); LayerScale 2: fc2's output (T r d a).

    That is T a (6 r d + (6 d + 4 f)/TP) for bf16 without FP8 (Megatron's s b h (10 + 24/t) counts a 4h MLP,
    no gate and no LayerScale). Without the gate: q, k, v, out only (o's input is the kernel output). With
    ``model.backend=te`` the count is the local model's (TE's kernels save about the same tensors), plus, with
    ``model.te_fused``, the concatenated weights TE saves ((4 d^2 + 2 d f)/TP, and their FP8 copy under FP8).
    """
    m, p = cfg.model, cfg.parallel
    a = _dtype_bytes(precision or cfg.train.precision)
    a_lin = 1 if m.fp8 != "none" else a
    t = p.tensor_parallel
    T = rows * cfg.data.seq_length
    r = 1 / t if p.sequence_parallel else 1.0
    d, f, h = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    seq_d = T * r * d  # elements of a sequence-slice [T r, d] tensor
    stats = 2 * T * r * 4  # a LayerNorm's mean and rstd (fp32 on CUDA)
    total = 2 * (seq_d * a + stats)  # LN1 and LN2 inputs + stats
    total += 2 * seq_d * a_lin  # LN1, LN2 outputs (linear inputs)
    # q_rot, k_rot, v, attention output; varlen: the flattened q, k, v its kernel saves and BOTH calls' outputs
    total += (5 if m.attention == "varlen" else 4) * T * d / t * a
    total += T * (h / t) * 4 * (1 if m.attention == "sdpa" else 2)  # softmax statistics (varlen: one per call)
    if m.gated_attention:
        total += T * d / t * a + T * d / t * a_lin  # sigmoid(gate), o's input
    total += 2 * seq_d * a  # LayerScale inputs (o output, fc2 output)
    total += 3 * T * f / t * a + T * f / t * a_lin  # SwiGLU
    if m.drop_path_rate > 0:
        total += 2 * rows * a
    if m.backend == "te" and m.te_fused:
        # TE's fused modules save the weight they read, here the concatenation of the model's separate q|gate|k|v
        # and gate|up tensors (model/te_spec.py), plus its FP8 copy under FP8
        weights = ((4 if m.gated_attention else 3) * d * d + 2 * d * f) / t
        total += weights * (a + (1 if m.fp8 != "none" else 0))
    return int(total)


def selective_layer_bytes(cfg: Config, rows: int, precision: str | None = None) -> int:
    """Bytes one ``TransformerBlock`` keeps under selective checkpointing (model/recompute.py): its input
    [T r, d] (the recomputation starts there) and the outputs of its GEMMs and attention kernel, which the
    recomputation reuses: q, gate, k, v (column-parallel: T d/TP each, in the activation dtype also under FP8:
    ``_scaled_mm`` returns bf16), the attention output (T d/TP) and its softmax statistics (as without
    checkpointing), o's and fc2's matmul outputs (row-parallel: the full-width partial sums [T, d] before their
    reduction), fc1's and gate_fc's outputs (T f/TP each). The DropPath mask is recomputed from the replayed RNG."""
    m, p = cfg.model, cfg.parallel
    a = _dtype_bytes(precision or cfg.train.precision)
    t = p.tensor_parallel
    T = rows * cfg.data.seq_length
    d, f, h = m.hidden_size, m.ffn_hidden_size, m.num_attention_heads
    total = _layer_input_bytes(cfg, rows, a)
    attention_outputs = 2 if m.attention == "varlen" else 1  # varlen keeps both calls' outputs
    total += T * a * ((4 if m.gated_attention else 3) * d / t + attention_outputs * d / t + 2 * d + 2 * f / t)
    total += T * (h / t) * 4 * (1 if m.attention == "sdpa" else 2)  # softmax statistics
    return int(total)


def kept_layer_bytes(cfg: Config, rows: int, mode: str) -> int:
    """What one block keeps from its forward until its backward under checkpointing ``mode``."""
    if mode == "full":
        return _layer_input_bytes(cfg, rows, _dtype_bytes(cfg.train.precision))
    if mode == "selective":
        return selective_layer_bytes(cfg, rows)
    return layer_activation_bytes(cfg, rows)


def _layer_input_bytes(cfg: Config, rows: int, a: int) -> int:
    """A checkpointed block keeps only its input [L r, B, d] (rng.checkpoint, non-reentrant)."""
    r = 1 / cfg.parallel.tensor_parallel if cfg.parallel.sequence_parallel else 1.0
    return int(rows * cfg.data.seq_length * r * cfg.model.hidden_size * a)


def _sample_fractions(cfg: Config, image_fraction: float | None, labelled_fraction: float | None):
    img, txt, lab = AVERAGE_SAMPLE[cfg.data.stage]
    return (img / (img + txt) if image_fraction is None else image_fraction,
            lab / (img + txt) if labelled_fraction is None else labelled_fraction)


def _model_states(cfg: Config, params: list[tuple[str, int, int]], dp: int, on_cuda: bool,
                  bucket_elements: int = BUCKET_ELEMENTS) -> dict[str, int]:
    """Parameters, gradients, master weights, Adam states and DeepSpeed buffers of one rank (module docstring).

    ``gradient_reduction``: the gradient bytes live at the end of backward beyond ``gradients`` +
    ``gradient_buckets`` (DeepSpeed 0.19.8 ``stage_1_and_2.py``). ZeRO-1 (``partition_gradients`` off, no
    ``overlap_comm``): the hooks only allocate the bucket; autograd keeps every full gradient (a_p N) until
    ``reduce_gradients`` (engine.allreduce_gradients after backward) copies them one by one into the bucket (each
    copy frees the autograd gradient: ``grad.data = bucket view``); the partition buffer ``grads_in_partition``
    (a_p N / DP) is allocated at the first bucket reduction, after B elements have been moved. Live gradient bytes
    peak at a_p N + buckets + a_p max(0, N/DP - B). ZeRO-2/3 reduce in the hooks during backward: at most the
    bucket(s) and the partition."""
    zero = cfg.parallel.zero_stage
    bf16 = cfg.train.precision == "bf16"
    a_p = 2 if bf16 else 4
    n = sum(c for _, c, _ in params)
    shard = math.ceil(n / dp) if zero >= 1 else n
    # ZeRO >= 1 clones its fp32 partition even when the parameters are fp32 (single_partition_of_fp32_groups,
    # fp32_partitioned_groups_flat); ZeRO-0 bf16 keeps an fp32 copy (FP16_UnfusedOptimizer / BF16_Optimizer)
    out = {"optimizer_states": 8 * shard, "master_weights": 4 * shard if (bf16 or zero >= 1) else 0}
    bucket = bucket_elements * a_p
    if zero == 1:
        # contiguous_gradients (DeepSpeed's default True) allocates one reduce bucket of reduce_bucket_size
        # elements in the first gradient hook (setup_buckets; overlap_comm is off at stage 1); under PP,
        # reduce_gradients(pipeline_parallel=True) appends a second one
        out["gradient_buckets"] = bucket * (2 if cfg.parallel.pipeline_parallel > 1 else 1)
    elif zero >= 2:
        out["gradient_buckets"] = bucket * (2 if on_cuda else 1)  # double buffered with overlap_comm (CUDA)
    else:
        out["gradient_buckets"] = 0
    if zero == 3:
        persistent = sum(c for _, c, _ in params if c <= ZERO3_PERSISTENCE_THRESHOLD)
        # every parameter has its partition (ds_tensor); persistent ones are also kept whole (measured)
        out["parameters"] = a_p * (math.ceil(n / dp) + persistent)
        per_module: dict = {}
        for _, c, mod in params:
            if c > ZERO3_PERSISTENCE_THRESHOLD:
                per_module[mod] = per_module.get(mod, 0) + c
        largest = max(per_module.values(), default=0)
        out["zero3_gathered_parameters"] = a_p * (largest + min(ZERO3_PREFETCH_ELEMENTS, largest)) if dp > 1 else 0
    else:
        out["parameters"] = a_p * n
    # ZeRO-1 too keeps only its reduced partition after backward (averaged_gradients, measured at DP=2)
    out["gradients"] = a_p * (shard if zero >= 1 else n)
    out["gradient_reduction"] = (a_p * n + a_p * max(0, shard - bucket_elements) - a_p * shard) if zero == 1 else 0
    if zero == 0:
        out["optimizer_step_transient"] = 4 * n if bf16 else 0
    else:
        # beyond the gradient partition (a_p N/DP): first flatten(averaged_gradients) (a_p N/DP) and its fp32 copy
        # (.to(fp32), 4 N/DP; a no-op in fp32); then, the partition freed, the fp32 gradient (4 N/DP) + AdamW's
        # temporaries: none with the fused CUDA AdamW, two fp32 [N/DP] with torch's single-tensor CPU AdamW
        # (``exp_avg_sq.sqrt() / bias_correction2_sqrt``, measured)
        flatten = a_p * shard + (4 * shard if bf16 else 0)
        adam = 4 * shard + (0 if on_cuda else 8 * shard) - a_p * shard
        out["optimizer_step_transient"] = max(flatten, adam)
    return out


def lm_head_bytes(cfg: Config, rows: int, labelled_fraction: float, on_cuda: bool = True) -> tuple[int, int]:
    """(saved, transient) bytes of ln_post + proj + LM head + cross-entropy (genlip.HeadMixin) on the last stage.

    Both paths save ln_post's gathered, full-length input (+ fp32 stats) and boolean indexing's int64 indices (2 per
    position); proj (when e != d) saves its input, the labelled rows h[:, :-1][selected] [N, d].
    ``model.loss_impl=fused`` (model/fused_loss.py) saves the two gradients it computed in the forward: the hidden
    states' [N, e] and the head weight's [V/TP, e] (in the parameters' dtype); transient during the forward: one
    chunk's logits and their gradient [C, V/TP] in the activation dtype (C = ``model.loss_chunk_size``, or N), the
    weight gradient's fp32 accumulator (bf16 parameters, several chunks), and, uncompiled (CPU), the chunk functions' fp32
    temporaries (~3 fp32 + 1 bool per logit at their peak; compiled on CUDA into kernels that keep none).
    ``reference``: the labelled rows are kept also without proj (by the LM head, or as the chunks' checkpoint
    inputs); unchunked (``model.loss_chunk_size`` 0 or >= N): proj's output [N, e] and the fp32 softmax [N, V/TP]
    that megatron-core's vocab_parallel_cross_entropy computes in place and saves. Transient: a chunk recomputed
    in backward holds its own softmax [C, V/TP] fp32 (+ proj output); in bf16 the bf16 logits (forward) or the bf16
    gradient of ``.float()`` (backward) exist beside the fp32 ones."""
    m, a = cfg.model, _dtype_bytes(cfg.train.precision)
    a_p = 2 if cfg.train.precision == "bf16" else 4
    d, e = m.hidden_size, m.text_embed_dim
    T = rows * cfg.data.seq_length
    n_lab = int(T * labelled_fraction)
    vloc = m.vocab_size // cfg.parallel.tensor_parallel
    chunk = m.loss_chunk_size
    live = n_lab if chunk <= 0 or n_lab <= chunk else chunk
    saved = T * d * a + 2 * T * 4 + 16 * n_lab
    transient = 0
    if m.loss_impl == "fused":
        saved += (n_lab * d * a if e != d else 0) + n_lab * e * a + vloc * e * a_p
        several = live < n_lab  # chunks: their weight gradients summed in an fp32 accumulator (bf16 parameters)
        transient += 2 * live * vloc * a + (vloc * e * 4 if a_p != 4 and several else 0) + (0 if on_cuda else live * vloc * 13)
        return int(saved), int(transient)
    saved += n_lab * d * a
    if live == n_lab:
        saved += (n_lab * e * a if e != d else 0) + n_lab * vloc * 4
    else:
        transient += live * vloc * 4 + (live * e * a if e != d else 0)
    if a != 4:
        transient += live * vloc * a
    return int(saved), int(transient)


def _stage_plan(cfg: Config, stage: int, dp: int, rows: int, ckpt: str, grad_accumulation: int,
                image_fraction: float, labelled_fraction: float, on_cuda: bool,
                bucket_elements: int = BUCKET_ELEMENTS) -> tuple[dict[str, int], int, dict]:
    m, p, t_cfg = cfg.model, cfg.parallel, cfg.train
    a = _dtype_bytes(t_cfg.precision)
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    s = cfg.data.seq_length
    T = rows * s
    d, e, f, h = m.hidden_size, m.text_embed_dim, m.ffn_hidden_size, m.num_attention_heads
    first, last = stage == 0, stage == pp - 1
    layers = m.num_layers // pp
    params = stage_parameters(cfg, stage)
    comp = _model_states(cfg, params, dp, on_cuda, bucket_elements)
    details: dict[str, int] = {}

    per_layer = layer_activation_bytes(cfg, rows)
    # activations of one micro-batch on this stage
    # checkpointed: every block keeps what its mode keeps, and the block in backward holds its whole recomputed
    # forward (per_layer) beside it (full: its input is counted twice, within the measured tolerance)
    kept = kept_layer_bytes(cfg, rows, ckpt)
    if ckpt == "full":
        blocks = layers * kept + per_layer
    elif ckpt == "selective":
        blocks = (layers - 1) * kept + per_layer
    else:
        blocks = layers * per_layer
    # rotary tables cos/sin [B, L, head_dim] in the activation dtype, built once per forward (per stage under PP)
    # and saved by every layer's RoPE multiply (one storage)
    shared = 2 * T * m.head_dim * a
    embed = 0
    if first:
        # patch embedding saves its float input (normalised pixels, N_img x C p^2, activation dtype); the vocab-
        # parallel embedding saves its int64 ids and masks (~2 x 8 bytes per token); in_proj its input [T, e]
        embed = int(T * image_fraction * m.num_channels * m.patch_size**2 * a) + 16 * T
        if e != d:
            embed += T * e * a
    comp["activations"] = int(blocks + shared + embed)
    details.update(blocks=int(blocks), rope_tables=int(shared), embedding=int(embed),
                   checkpoint_inputs=int(layers * _layer_input_bytes(cfg, rows, a)) if ckpt != "none" else 0)

    # attention: SDPA takes the dense bool mask [B, 1, L, L] (built once per forward) and converts it to an additive
    # mask in the activation dtype inside every call, which it saves for backward (CPU flash / CUDA efficient);
    # FlexAttention keeps a BlockMask (4 int32 tables [B, 1, L/128, L/128] + counts) and no L x L tensor (compiled)
    if m.attention == "sdpa":
        saved_masks = 1 if ckpt != "none" else layers  # selective recomputes the mask conversion too
        comp["attention_workspace"] = int(rows * s * s * (1 + a * saved_masks))
    elif m.attention == "varlen":
        # the VarlenMask (three int32 cu_seqlens of `capacity` + 1 and a bool per token) and, in one backward call at a
        # time, FA2's fp32 workspaces (flash_api.cpp mha_varlen_bwd): dq_accum [N + 128 capacity, h, head dim
        # rounded up to 32] and softmax_d [h, N + 128 capacity]; capacity as varlen_mask buckets it for packed rows
        # of short samples (at least one segment per 64 tokens, so 128 capacity >= 2N: the workspace is ~3N rows;
        # a stage-1 sample, >= 204 tokens in 3 segments, stays under one per 64; shorter samples would grow it)
        capacity = segment_capacity(0, T)
        comp["attention_workspace"] = int(3 * (capacity + 1) * 4 + T)
        if on_cuda:
            padded_rows = T + 128 * capacity
            comp["attention_workspace"] += int(4 * padded_rows * math.ceil(h / tp) * (fa2_head_dim(m.head_dim) + 1))
        else:
            # CPU path (attention.varlen_segments): per call a bool [B, L, L] mask and its temporaries (~4 bytes per
            # score) and SDPA's additive copy of it, which every call saves for backward (two calls per block;
            # checkpointed blocks hold only the recomputed block's); analytic, not calibrated by a measured step
            saved_calls = 2 if ckpt != "none" else 2 * layers
            details["attention_cpu_transient"] = int(rows * s * s * 4)
            comp["attention_workspace"] += int(rows * s * s * a * saved_calls) + details["attention_cpu_transient"]
    else:
        nb = math.ceil(s / FLEX_BLOCK)
        comp["attention_workspace"] = int(rows * (4 * nb * nb * 4 + 4 * nb * 4))
        if not on_cuda:
            # uncompiled FlexAttention (CPU) runs its math reference: score-sized [B, h/TP, L, L] temporaries during
            # the kernel and its backward, ~5 fp32 + 1 bf16 + 1 bool (23 bytes per score; calibrated on the CPU
            # steps of tests/test_memory_plan.py, not derived; none on CUDA, where it is compiled)
            details["attention_cpu_transient"] = int(rows * math.ceil(h / tp) * s * s * 23)
            comp["attention_workspace"] += details["attention_cpu_transient"]

    lm = 0
    if last:
        saved, transient = lm_head_bytes(cfg, rows, labelled_fraction, on_cuda)
        lm = saved + transient
        details["lm_head_saved"] = saved
    comp["lm_head"] = int(lm)

    # 1F1B (deepspeed TrainSchedule): stage i holds up to min(PP - i, micro-batches) micro-batches' activations;
    # each in-flight micro-batch also has its stage input buffer ([L r, B, d] hidden + 6 int64 per token)
    in_flight = min(pp - stage, grad_accumulation) if pp > 1 else 1
    r = 1 / tp if p.sequence_parallel else 1.0
    boundary = int(T * r * d * a + T * 6 * 8) if pp > 1 else 0
    saved_mb = layers * kept + shared + embed
    if m.attention == "sdpa" and ckpt == "none":
        saved_mb += rows * s * s * a * layers
    comp["pipeline_in_flight"] = int((in_flight - 1) * (saved_mb + boundary) + (in_flight * boundary if pp > 1 else 0))

    # backward of one block: gradients of its SwiGLU intermediates (3 T f/TP) and of the residual stream (2 T r d)
    comp["backward_transient"] = int(T * a * (3 * f / tp + 2 * r * d))
    comp["fp8_weight_cache"] = 0
    if m.fp8 != "none":  # one FP8 copy of every block projection of the stage, kept from forward to backward
        comp["fp8_weight_cache"] = sum(c for name, c, _ in params if name.startswith("layers.") and c > d)
    # the micro-batch on the device: 7 int64 per slot (input_ids, labels, 3 positions, sample_ids, token_kinds) and
    # uint8 patches
    batch = int(T * 7 * 8 + T * image_fraction * m.num_channels * m.patch_size**2)
    comp["batch"] = batch
    d_cfg = cfg.data
    comp["loader_pinned"] = int(batch * (d_cfg.prefetch_factor * max(1, d_cfg.num_workers) + 1))

    # the peak is the largest of three moments of a step, over the states that live through it (the ZeRO reduce
    # bucket is allocated in backward's first gradient hook, when the saved activations are largest, and counted
    # throughout):
    # * the activation phase (end of forward / start of backward): the saved activations and transients; the
    #   gradients (ZeRO-0: they grow as the activations are freed; ZeRO >= 1: the partition) counted in full;
    # * the gradient reduction (end of backward, activations freed): ZeRO-1's full-size autograd gradients that
    #   wait for reduce_gradients (``gradient_reduction``) + the micro-batch;
    # * the optimizer step: the gradient partition + the step's transient.
    static = (comp["parameters"] + comp["optimizer_states"] + comp["master_weights"]
              + comp.get("zero3_gathered_parameters", 0))
    zero, grads, buckets = p.zero_stage, comp["gradients"], comp["gradient_buckets"]
    phase = sum(comp[k] for k in ("activations", "attention_workspace", "lm_head", "pipeline_in_flight",
                                  "backward_transient", "fp8_weight_cache", "batch"))
    # at the start of backward no gradient exists yet except ZeRO-3's partition buffer (allocated at init); the
    # ZeRO-1/2 bucket exists from the first hook; ZeRO-1/2 release it at the end of backward (_release_ipg_buffers)
    activation_phase = static + buckets + phase + (grads if zero == 3 else 0)
    reduction_phase = static + buckets + grads + comp["gradient_reduction"] + comp["batch"]
    step_phase = static + grads + comp["optimizer_step_transient"] + (buckets if zero == 3 else 0)
    total = max(activation_phase, reduction_phase, step_phase)
    details.update(in_flight_micro_batches=in_flight, activation_phase=int(activation_phase),
                   reduction_phase=int(reduction_phase), step_phase=int(step_phase))
    return comp, int(total), details


def default_world_size(cfg: Config) -> int:
    """The world ``--dry-run`` assumes: parallel.data_parallel x TP x PP when the config sets it (a recipe with
    gradient accumulation), else global_batch_size / micro_batch_size x TP x PP (no gradient accumulation)."""
    t, p = cfg.train, cfg.parallel
    dp = p.data_parallel or max(1, t.global_batch_size // t.micro_batch_size)
    return dp * p.tensor_parallel * p.pipeline_parallel


def estimate_memory(cfg: Config, world_size: int | None = None, micro_batch_size: int | None = None,
                    activation_checkpointing: bool | str | None = None, *, image_fraction: float | None = None,
                    labelled_fraction: float | None = None, on_cuda: bool = True,
                    bucket_elements: int = BUCKET_ELEMENTS) -> MemoryPlan:
    """The per-GPU memory plan of ``cfg`` (None: from the config; ``world_size`` None: as ``--dry-run``).
    ``image_fraction`` / ``labelled_fraction``: shares of a row's slots that are image patches / predict a label
    (default: the average sample of --dry-run, GENLIP_SPEC.md §4); ``on_cuda``: DeepSpeed's CUDA settings
    (overlap_comm double buffers); ``bucket_elements``: DeepSpeed's ``reduce_bucket_size``."""
    t, p = cfg.train, cfg.parallel
    rows = t.micro_batch_size if micro_batch_size is None else micro_batch_size
    ckpt = checkpointing_mode(t.activation_checkpointing if activation_checkpointing is None
                              else activation_checkpointing)
    if world_size is None:
        world_size = default_world_size(cfg)
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    dp = max(1, world_size // (tp * pp))
    grad_accumulation = max(1, t.global_batch_size // (rows * dp))
    img, lab = _sample_fractions(cfg, image_fraction, labelled_fraction)
    best = None
    for stage in sorted({0, pp - 1}):
        comp, total, details = _stage_plan(cfg, stage, dp, rows, ckpt, grad_accumulation, img, lab, on_cuda,
                                           bucket_elements)
        if best is None or total > best[2]:
            best = (stage, comp, total, details)
    stage, comp, total, details = best
    layout = {"tensor_parallel": tp, "pipeline_parallel": pp, "data_parallel": dp, "zero_stage": p.zero_stage,
              "precision": t.precision, "fp8": cfg.model.fp8, "sequence_parallel": p.sequence_parallel,
              "seq_length": cfg.data.seq_length, "grad_accumulation": grad_accumulation,
              "attention": cfg.model.attention}
    notes = []
    if cfg.model.attention == "sdpa" and cfg.data.seq_length >= 4096:
        notes.append("model.attention=sdpa saves a dense [B, 1, L, L] mask per layer: use flex for long rows")
    return MemoryPlan(components=comp, total_bytes=total,
                      per_layer_activation_bytes=layer_activation_bytes(cfg, rows), micro_batch_size=rows,
                      activation_checkpointing=ckpt, world_size=world_size, layout=layout, stage=stage, notes=notes,
                      details=details)


def max_micro_batch_size(cfg: Config, world_size: int | None = None, gpu_gib: float = 80.0,
                         activation_checkpointing: bool | str | None = None, limit: int = 4096, **fractions) -> int:
    """The largest micro_batch_size whose plan fits ``gpu_gib`` (0: not even one row). The world size is held
    fixed (the data-parallel size does not change with the micro-batch)."""
    if world_size is None:
        world_size = default_world_size(cfg)

    def fits(b: int) -> bool:
        return estimate_memory(cfg, world_size, b, activation_checkpointing, **fractions).fits(gpu_gib)

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # total grows with the micro-batch: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def memory_report(cfg: Config, world_size: int | None = None, gpu_gib: float = 80.0,
                  micro_batch_size: int | None = None, **fractions) -> tuple[str, dict]:
    """The printed tables (activation checkpointing as configured, then the other two modes) and the JSON of
    ``--dry-run`` / ``tools/model_info.py``: plan.as_dict() | gpu_memory_gb, fits, max_micro_batch_size;
    ``alternatives`` (the same for the other modes) and ``flipped`` (none <-> full; selective -> none)."""
    ckpt = cfg.train.activation_checkpointing
    modes = [ckpt] + [m for m in CHECKPOINTING_MODES if m != ckpt]
    texts, infos = [], {}
    for c in modes:
        plan = estimate_memory(cfg, world_size, micro_batch_size, c, **fractions)
        mmb = max_micro_batch_size(cfg, world_size, gpu_gib, c, **fractions)
        texts.append(plan.table(gpu_gib) + f"\n  largest micro_batch_size that fits {gpu_gib:g} GB: {mmb}")
        infos[c] = plan.as_dict() | {"gpu_memory_gb": gpu_gib, "fits": plan.fits(gpu_gib), "max_micro_batch_size": mmb}
    others = {c: infos[c] for c in modes[1:]}
    info = infos[ckpt] | {"alternatives": others, "flipped": others["full" if ckpt == "none" else "none"]}
    return "\n".join(texts), info
