"""Typed configuration: dataclasses loaded from YAML, with dotted command-line overrides.

A config file is a YAML mapping whose top-level keys are the sections below (``model``, ``tokenizer``,
``data``, ``parallel``). ``--set model.num_layers=4`` style overrides are applied after the file.
Unknown keys are an error that names the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the offending field(s)."""


@dataclass
class ModelConfig:
    """The GenLIP transformer (GENLIP_SPEC.md §1-2)."""

    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176  # SwiGLU inner width
    num_attention_heads: int = 4
    text_embed_dim: int = 64  # in_proj/proj exist only when this differs from hidden_size
    vocab_size: int = 151936  # model (padded) vocabulary; must cover the tokenizer
    patch_size: int = 16
    num_channels: int = 3
    mrope_section: list[int] = field(default_factory=lambda: [12, 12, 12])  # section[0] is never read
    rope_theta: float = 10000.0
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.1  # same rate in every layer, per packed row
    layernorm_eps: float = 1e-6
    init_std: float = 0.02
    gated_attention: bool = True
    backend: str = "local"  # layer classes: "local" (megatron-core TP layers) | "te" (Transformer Engine, GPU)
    # model.backend=te: LN1 + q|gate|k|v as one te.LayerNormLinear and LN2 + SwiGLU MLP as one te.LayerNormMLP (FP8
    # casts fused into the norm and activation kernels; same parameter names, model/te_fused.py), or false: separate
    # te.LayerNorm and te.Linear modules. Ignored with model.backend=local
    te_fused: bool = True
    # attention kernel: "sdpa" (dense prefix-LM mask reference) | "flex" (FlexAttention, 128-token tiles) | "varlen"
    # (the exact mask as two FlashAttention-2 variable-length calls; CUDA bf16, samples laid out [image][text])
    attention: str = "sdpa"
    # labelled positions per LM-head/cross-entropy chunk (0: all at once): bounds the [chunk, V/TP] fp32 logits
    loss_chunk_size: int = 0
    # "fused": LM head + cross-entropy in one pass, logits once per chunk, gradients computed in the forward
    # (model/fused_loss.py) | "reference": megatron-core's vocab-parallel cross-entropy, chunks recomputed in backward
    loss_impl: str = "fused"
    # FP8 on the transformer-block projections (embeddings and LM head stay bf16); needs train.precision=bf16 and CUDA:
    # "none" | Transformer Engine recipes (model.backend=te) "delayed" | "current" | "mxfp8"
    # | torchao float8 (model.backend=local, parallel.tensor_parallel=1) "torchao-tensorwise" | "torchao-rowwise"
    fp8: str = "none"
    params_dtype: str = "float32"  # dtype the parameters are created in

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TokenizerConfig:
    """Which BPE vocabulary encodes text (GENLIP_SPEC.md §3)."""

    kind: str = "qwen"  # "qwen" (vendored Qwen ranks file) | "bpe" (a ranks file trained by tools/train_tokenizer.py)
    path: str | None = None  # ranks file; None = the vendored Qwen file
    prompt: str = "Describe the image in detail."  # stage-1 user prompt, no loss


@dataclass
class BlendSource:
    """One dataset of a weighted mixture (``data.train_blend``)."""

    data: str | list[str]  # dataset prefix(es), glob or .txt list, as data.train_data
    weight: float  # relative share of packed rows (normalised over the blend)


@dataclass
class DataConfig:
    """How images and captions become packed rows (GENLIP_SPEC.md §2.1, §2.4, §4)."""

    stage: int = 1  # 1: fixed square resize; 2: native aspect ratio (smart_resize)
    image_size: int = 224  # stage 1: resize target (224 -> 14x14 = 196 patches)
    min_pixels: int = 4096  # stage 2 smart_resize budget
    max_pixels: int = 262144
    seq_length: int = 16384  # packed row length
    max_sample_length: int = 16384  # per-sample cap (stage 2 uses 4096); longer samples are skipped
    max_aspect_ratio: float = 200.0  # images longer than this times their width (or vice versa) are skipped
    background: list[int] = field(default_factory=lambda: [255, 255, 255])  # RGB under transparent pixels
    drop_duplicate_keys: bool = False  # preprocessing: a key seen earlier in the same shard is reported; true: dropped
    # indexed dataset(s) built by tools/preprocess_data.py: a prefix, a glob of prefixes, a .txt file listing
    # prefixes, or a list of those (concatenated in order)
    train_data: str | list[str] | None = None
    valid_data: str | list[str] | None = None  # held-out dataset(s), same forms
    # weighted mixture instead of train_data, e.g. [{data: /d/llava, weight: 0.7}, {data: /d/sharegpt, weight: 0.3}]:
    # rows are drawn from each dataset's own packed stream in these proportions (deterministic, resumable)
    train_blend: list[BlendSource] = field(default_factory=list)
    pack_buffer_size: int = 2048  # samples scanned when filling a row (first-fit in arrival order)
    seed: int = 1234  # shuffling and packing seed (epoch e has its own permutation)
    pack_index_dir: str | None = None  # where pack indices are kept; None = beside the (first) dataset: PREFIX.packs
    # epochs missing from the pack index at start-up: true = built once, under a lock, by one process before
    # training; false = an error naming tools/build_pack_index.py (build them ahead for large datasets)
    build_missing_pack_index: bool = True
    pack_index_workers: int = 0  # processes that pack chunks of an epoch (0 = min(8, CPU count))
    max_open_parts: int = 64  # dataset parts kept memory-mapped per DataLoader worker
    num_workers: int = 2  # DataLoader worker processes per rank
    prefetch_factor: int = 2  # micro-batches each worker prepares ahead
    jpeg_draft: bool = False  # decode JPEGs at a reduced scale (PIL draft mode): faster, slightly different pixels
    # resume although a setting that decides the data stream (STREAM_FIELDS, the dataset) differs from the
    # checkpoint's: continue from its consumed row count on the new stream (logged); false: refuse, naming the field
    allow_new_stream: bool = False


@dataclass
class ParallelConfig:
    """Parallel layout: world size = tensor_parallel x pipeline_parallel x data_parallel."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    data_parallel: int | None = None  # None: world size / (TP x PP); else checked against the world size
    zero_stage: int = 1  # DeepSpeed ZeRO stage over the data-parallel group: 0, 1, 2 or 3 (<= 1 with PP > 1)
    # Megatron sequence parallelism: norms, LayerScale, DropPath and residuals run on L/TP slices of each row
    # (needs tensor_parallel > 1 and data.seq_length divisible by it)
    sequence_parallel: bool = False


@dataclass
class TrainConfig:
    """Optimisation, checkpoints, logging and evaluation (GENLIP_SPEC.md §5)."""

    output_dir: str = "outputs/run"  # checkpoints, logs, TensorBoard, summary
    micro_batch_size: int = 1  # packed rows per data-parallel rank per micro-step
    global_batch_size: int = 1  # packed rows per optimizer step over all DP ranks (= micro x DP x grad. accumulation)
    train_steps: int = 100  # optimizer steps of the whole run (the lr schedule spans them)
    lr: float = 1e-3  # peak learning rate
    min_lr: float = 1e-6  # cosine floor
    warmup_ratio: float = 0.007  # linear warmup from 0 over this fraction of train_steps
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    weight_decay: float = 0.01  # AdamW, on every parameter
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global gradient-norm clipping
    precision: str = "bf16"  # "bf16" (fp32 master weights and optimizer state) or "fp32"; fp16 is not offered
    # what backward recomputes of each transformer block (model/recompute.py; RNG replayed): "none" (keep every
    # activation: fastest, most memory) | "selective" (keep GEMM and attention outputs, recompute the element-wise
    # ops: no GEMM runs twice) | "full" (keep only the block input, recompute the whole block); true/false = full/none
    activation_checkpointing: bool | str = "none"
    # CUDA: torch.compile each transformer block (its element-wise ops fused into few kernels, FP8 casts fused into
    # their producers) and the FlexAttention kernels (megatron_genlip/platform.py). CPU: never
    compile: bool = True
    seed: int = 42
    log_interval: int = 1  # steps between log lines
    save_interval: int = 1000  # steps between checkpoints (and one at the end)
    save_final: bool = True  # the checkpoint at the last step (false: a benchmark run that keeps no multi-GB state)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted (0: keep all)
    # keep the checkpoint of the best train.best_metric (saved at each new best, never deleted by keep_last;
    # recorded in checkpoints/best.json); needs an evaluator that reports it
    keep_best: bool = False
    # the metric best.json and keep_best follow: "EVALUATOR/METRIC" (e.g. "probe/top1"); "" = the first
    # validation_loss evaluator's val_loss
    best_metric: str = ""
    best_mode: str = ""  # "min" or "max"; "" = min for a loss, max otherwise
    eval_at_start: bool = False  # run every evaluator once on the initial model (step 0), to compare with the trained
    load: str | None = None  # checkpoint directory to start from when output_dir has none
    eval_interval: int = 1000  # steps between evaluations (and one at the end); an evaluator's own interval wins
    eval_rows: int = 8  # held-out packed rows for the validation loss
    eval_captions: int = 16  # held-out images captioned for exact-match / token accuracy
    max_new_tokens: int = 64  # generation limit for evaluation captions
    nan_policy: str = "skip"  # non-finite loss/grad norm: "skip" the step (counted) or "stop" the run
    max_consecutive_skips: int = 20  # stop (exit 3, naming the last good checkpoint) after this many skipped steps in a row; 0: never
    verify_checkpoint: bool = True  # on resume, check every file's sha256 against the manifest (sizes are always checked)
    allow_fresh_start: bool = False  # start from scratch when checkpoints exist but none can be resumed from
    inject_nan_steps: list[int] = field(default_factory=list)  # fault injection: poison these steps' batches
    # [FIRST, LAST]: record optimizer steps FIRST..LAST with torch.profiler on every rank -> OUTPUT_DIR/profile/
    # (phase table, operator table, Perfetto/Chrome timeline); [] = off
    profile_steps: list[int] = field(default_factory=list)
    # count host synchronisations of the CUDA stream per optimizer step (torch.cuda.set_sync_debug_mode) and log
    # them as syncs_per_step; needs a GPU
    sync_debug: bool = False
    peak_tflops: float = 989.0  # per device, for MFU (H100 dense bf16)
    tensorboard: bool = True
    progress_bar: str = "auto"  # "auto" (when stderr is a terminal), "always" or "never"
    wandb_project: str = ""  # Weights & Biases project to log the TensorBoard scalars to ("" = off; pip install wandb)
    wandb_mode: str = ""  # "online", "offline" (no network; `wandb sync` later) or "disabled"; "" = $WANDB_MODE or online

    def __post_init__(self) -> None:
        self.activation_checkpointing = checkpointing_mode(self.activation_checkpointing)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # evaluators (megatron_genlip/evaluation): a list of {name, type, interval, data, options}, or a mapping
    # name -> {type, interval, data, options}; empty: "val" (validation_loss) and "captions" (captioning) on
    # data.valid_data. Checked at start-up and by --dry-run.
    evaluation: Any = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@contextlib.contextmanager
def field_errors(name: str):
    """Start-up checks of the files a config names (datasets, tokenizer) fail as configuration errors that name
    the field, without a traceback (the trainer and ``--dry-run``)."""
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError) as e:
        text = re.sub(r"\b(stage|image_size|min_pixels|max_pixels|background): dataset", r"data.\1: dataset", str(e))
        text = text.replace("tokenizer_fingerprint: dataset", "tokenizer (tokenizer.kind/tokenizer.path): dataset")
        raise ConfigError(f"{name}: {text}") from None


# --------------------------------------------------------------------------------------------------
# building dataclasses from plain dicts, with typed values and unknown-key errors


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value to the annotated type ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for alternative in inner[:-1]:  # e.g. str | list[str]: the first form the value fits
            try:
                return _coerce(value, alternative, where)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads "1e-3" as a string; accept the usual notation
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """Parse the right-hand side of ``key=value`` with YAML rules (numbers, bools, lists, null)."""
    return yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config mapping (in place) and return it."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        dotted, text = item.split("=", 1)
        parts = dotted.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return raw


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict[str, Any]:
    """A config file as a raw mapping; ``base: OTHER.yaml`` (relative to the file) is loaded first and
    overridden section by section, so recipe configs can extend the model configs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ConfigError(f"config file {path} includes itself through 'base'")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = raw.pop("base", None)
    if base is not None:
        raw = _merge(read_yaml(path.parent / base, _seen + (path.resolve(),)), raw)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config file (or defaults when ``path`` is None) and apply dotted overrides."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    apply_overrides(raw, list(overrides or []))
    cfg = _from_dict(Config, raw)
    validate(cfg)
    validate_model(cfg.model, cfg.train, cfg.parallel)
    return cfg


TOKENIZER_KINDS = ("qwen", "bpe")  # as megatron_genlip.data.tokenizer.TOKENIZER_KINDS (a test keeps them equal)


def validate(cfg: Config) -> None:
    """Check every field with a range at start-up, before any process, file or engine is touched, and report
    all problems at once, each naming its field. The cross-field and world-size checks of the parallel layout
    are :func:`resolve_layout`'s; those of the model's shapes :func:`validate_model`'s."""
    not_finite = [name for name, value in _float_fields(cfg) if value is not None and not math.isfinite(value)]
    errors = [f"{name} must be a finite number, got {getattr(getattr(cfg, name.split('.')[0]), name.split('.')[1])!r}"
              for name in not_finite]

    def need(ok: bool, name: str, rule: str) -> None:
        section, key = name.split(".")
        if not ok and name not in not_finite:
            errors.append(f"{name} must be {rule}, got {getattr(getattr(cfg, section), key)!r}")

    m, tok, d, p, t = cfg.model, cfg.tokenizer, cfg.data, cfg.parallel, cfg.train
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "text_embed_dim", "vocab_size",
                "patch_size", "num_channels"):
        need(getattr(m, key) >= 1, f"model.{key}", ">= 1")
    need(m.rope_theta > 0, "model.rope_theta", "> 0")
    need(m.layernorm_eps > 0, "model.layernorm_eps", "> 0")
    need(m.init_std >= 0, "model.init_std", ">= 0")
    need(tok.kind in TOKENIZER_KINDS, "tokenizer.kind", f"one of {', '.join(TOKENIZER_KINDS)}")
    need(tok.kind != "bpe" or bool(tok.path), "tokenizer.path", "set for tokenizer.kind=bpe (a ranks file written by "
         "tools/train_tokenizer.py)")
    need(d.stage in (1, 2), "data.stage", "1 or 2")
    need(d.image_size >= 1 and d.image_size % max(1, m.patch_size) == 0, "data.image_size",
         f"a positive multiple of model.patch_size ({m.patch_size})")
    need(d.min_pixels >= 1, "data.min_pixels", ">= 1")
    need(d.max_pixels >= d.min_pixels, "data.max_pixels", f">= data.min_pixels ({d.min_pixels})")
    image_tokens = (d.image_size // max(1, m.patch_size)) ** 2 if d.stage == 1 else 1
    need(d.seq_length > image_tokens, "data.seq_length", f"> {image_tokens} (a packed row must hold at least one "
         "sample: its image tokens plus its text)")
    need(d.max_sample_length >= 1, "data.max_sample_length", ">= 1")
    need(d.pack_buffer_size >= 1, "data.pack_buffer_size", ">= 1 (samples scanned when filling a row)")
    need(d.seed >= 0, "data.seed", ">= 0")
    need(d.num_workers >= 0, "data.num_workers", ">= 0 (0: load in the training process)")
    need(p.data_parallel is None or p.data_parallel >= 1, "parallel.data_parallel", ">= 1 or null")
    for key in ("micro_batch_size", "global_batch_size", "train_steps", "log_interval", "save_interval",
                "eval_interval", "eval_rows", "max_new_tokens"):
        need(getattr(t, key) >= 1, f"train.{key}", ">= 1")
    need(t.lr > 0, "train.lr", "> 0")
    need(0 <= t.min_lr <= max(t.lr, 0), "train.min_lr", f"within [0, train.lr ({t.lr})]")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "in [0, 1)")
    need(t.warmup_steps is None or t.warmup_steps >= 0, "train.warmup_steps", ">= 0 or null")
    need(t.weight_decay >= 0, "train.weight_decay", ">= 0")
    need(0 <= t.adam_beta1 < 1, "train.adam_beta1", "in [0, 1)")
    need(0 <= t.adam_beta2 < 1, "train.adam_beta2", "in [0, 1)")
    need(t.adam_eps > 0, "train.adam_eps", "> 0")
    need(t.clip_grad >= 0, "train.clip_grad", ">= 0 (0: no clipping)")
    need(t.seed >= 0, "train.seed", ">= 0")
    need(t.keep_last >= 0, "train.keep_last", ">= 0 (0: keep every checkpoint)")
    need(t.best_mode in ("", "min", "max"), "train.best_mode", "'min', 'max' or '' (min for a loss, max otherwise)")
    need(t.eval_captions >= 0, "train.eval_captions", ">= 0")
    need(t.peak_tflops > 0, "train.peak_tflops", "> 0")
    need(t.max_consecutive_skips >= 0, "train.max_consecutive_skips", ">= 0 (0: never stop for skipped steps)")
    need(all(s >= 1 for s in t.inject_nan_steps), "train.inject_nan_steps", "a list of steps >= 1")
    need(not t.profile_steps or (len(t.profile_steps) == 2 and 1 <= t.profile_steps[0] <= t.profile_steps[1]),
         "train.profile_steps", "[] or [FIRST, LAST] with 1 <= FIRST <= LAST (optimizer steps, inclusive)")
    need(warmup_steps(t) < t.train_steps, "train.warmup_steps", f"shorter than train.train_steps ({t.train_steps}) "
         "(train.warmup_ratio x train.train_steps when train.warmup_steps is null)")
    need(t.wandb_mode in WANDB_MODES, "train.wandb_mode", f"one of {', '.join(map(repr, WANDB_MODES))}")
    need(t.activation_checkpointing in CHECKPOINTING_MODES, "train.activation_checkpointing",
         f"one of {', '.join(CHECKPOINTING_MODES)} (or true = full, false = none)")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))


def _float_fields(cfg: Config):
    """("section.key", value) of every float field (NaN and infinity pass every comparison test unnoticed)."""
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(obj):  # the evaluation list: checked by megatron_genlip.evaluation
            continue
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if hints[f.name] in (float, float | None):
                yield f"{section.name}.{f.name}", getattr(obj, f.name)


WANDB_MODES = ("", "online", "offline", "disabled")
CHECKPOINTING_MODES = ("none", "selective", "full")
LOSS_IMPLS = ("fused", "reference")  # model.loss_impl  # train.activation_checkpointing (model/recompute.py)


def checkpointing_mode(value) -> str:
    """``train.activation_checkpointing`` as one of :data:`CHECKPOINTING_MODES`: YAML true/false (the setting's
    older form) mean full/none; other values are returned as they are (``validate`` names a wrong one)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    return value
FP8_TE_RECIPES = ("delayed", "current", "mxfp8")
FP8_TORCHAO_RECIPES = ("torchao-tensorwise", "torchao-rowwise")


def validate_model(m: ModelConfig, train: TrainConfig | None = None, parallel: ParallelConfig | None = None) -> None:
    """Fail fast, naming the fields, on a model that cannot be built (``train``/``parallel``: the FP8 checks)."""
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(
            f"model.hidden_size ({m.hidden_size}) must be divisible by "
            f"model.num_attention_heads ({m.num_attention_heads})"
        )
    if m.head_dim % 2:
        raise ConfigError(f"head dim model.hidden_size/model.num_attention_heads = {m.head_dim} must be even (RoPE)")
    if len(m.mrope_section) != 3:
        raise ConfigError(f"model.mrope_section must have 3 entries (T, H, W), got {m.mrope_section}")
    from megatron_genlip.model.rope import unplaceable_section

    if problem := unplaceable_section(m.head_dim, m.mrope_section):
        raise ConfigError(f"model.{problem}")
    if m.backend not in ("local", "te"):
        raise ConfigError(f"model.backend must be 'local' or 'te', got {m.backend!r}")
    if m.attention not in ("sdpa", "flex", "varlen"):
        raise ConfigError(f"model.attention must be 'sdpa', 'flex' or 'varlen', got {m.attention!r}")
    if train is not None and m.backend == "te" and train.activation_checkpointing == "selective":
        raise ConfigError("train.activation_checkpointing=selective does not see Transformer Engine's GEMMs (they run "
                          "outside torch's dispatcher, so it would recompute them all): with model.backend=te use "
                          "train.activation_checkpointing=full or none")
    if m.loss_impl not in LOSS_IMPLS:
        raise ConfigError(f"model.loss_impl must be one of {', '.join(LOSS_IMPLS)}, got {m.loss_impl!r}")
    if m.loss_chunk_size < 0:
        raise ConfigError(f"model.loss_chunk_size must be >= 0 (0 = no chunking), got {m.loss_chunk_size}")
    _validate_fp8(m, train, parallel)
    if m.params_dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"model.params_dtype must be 'float32' or 'bfloat16', got {m.params_dtype!r}")
    if not 0.0 <= m.drop_path_rate < 1.0:
        raise ConfigError(f"model.drop_path_rate must be in [0, 1), got {m.drop_path_rate}")


def _validate_fp8(m: ModelConfig, train: TrainConfig | None, parallel: ParallelConfig | None) -> None:
    """Field combinations only; CUDA, the GPU generation and the packages are checked when the model is built."""
    if m.fp8 == "none":
        return
    if m.fp8 not in FP8_TE_RECIPES + FP8_TORCHAO_RECIPES:
        raise ConfigError(f"model.fp8 must be 'none', one of {', '.join(FP8_TE_RECIPES)} (model.backend=te) or "
                          f"one of {', '.join(FP8_TORCHAO_RECIPES)} (model.backend=local), got {m.fp8!r}")
    if m.fp8 in FP8_TE_RECIPES and m.backend != "te":
        raise ConfigError(f"model.fp8={m.fp8} is a Transformer Engine recipe: it needs model.backend=te "
                          f"(got {m.backend!r}); with model.backend=local use model.fp8=torchao-tensorwise or "
                          "torchao-rowwise")
    if m.fp8 in FP8_TORCHAO_RECIPES and m.backend != "local":
        raise ConfigError(f"model.fp8={m.fp8} (torchao) needs model.backend=local (got {m.backend!r}); "
                          f"with model.backend=te use model.fp8 in {FP8_TE_RECIPES}")
    if train is not None and train.precision != "bf16":
        raise ConfigError(f"model.fp8={m.fp8} needs train.precision=bf16 (got {train.precision!r})")
    if m.fp8 in FP8_TORCHAO_RECIPES and parallel is not None and parallel.tensor_parallel != 1:
        raise ConfigError(f"model.fp8={m.fp8} converts plain nn.Linear projections and needs "
                          f"parallel.tensor_parallel=1 (got {parallel.tensor_parallel}); use model.backend=te with "
                          f"model.fp8 in {FP8_TE_RECIPES} for FP8 under tensor parallelism")
    if m.fp8 in FP8_TORCHAO_RECIPES and parallel is not None and parallel.zero_stage == 3:
        raise ConfigError(f"model.fp8={m.fp8} with parallel.zero_stage=3: torchao's Float8Linear saves the whole "
                          "weight it was given for its backward (float8_linear.py: save_for_backward(input, "
                          "weight.t())), so every block's ZeRO-3-gathered weight would stay alive from forward to "
                          "backward and ZeRO-3 would shard nothing of them; use parallel.zero_stage=1 or 2")
    if m.fp8 == "delayed" and train is not None and checkpointing_mode(train.activation_checkpointing) != "none":
        raise ConfigError(
            f"model.fp8=delayed with train.activation_checkpointing={train.activation_checkpointing}: a recomputed "
            "block would be quantized with the scales that the forward's FP8 region updated when it closed, not "
            "with those its forward used (Transformer Engine keeps them only under its own checkpoint), and its "
            "amax would enter the history twice. Use model.fp8=current (each tensor's scale from the tensor "
            "itself: the recomputation quantizes exactly as the forward did) or train.activation_checkpointing=none")


@dataclass(frozen=True)
class Layout:
    """The resolved parallel layout of a run."""

    world_size: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    grad_accumulation: int


def resolve_layout(cfg: Config, world_size: int) -> Layout:
    """Check the parallel/batch fields against each other and the world size; fail naming the fields."""
    p, t, m = cfg.parallel, cfg.train, cfg.model
    errors = []
    tp, pp = p.tensor_parallel, p.pipeline_parallel
    if tp < 1 or pp < 1:
        raise ConfigError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1")
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by parallel.tensor_parallel ({tp}) x "
                          f"parallel.pipeline_parallel ({pp})")
    dp = world_size // (tp * pp)
    if p.data_parallel is not None and p.data_parallel != dp:
        errors.append(f"parallel.data_parallel ({p.data_parallel}) x parallel.tensor_parallel ({tp}) x "
                      f"parallel.pipeline_parallel ({pp}) != world size {world_size}")
    if p.zero_stage not in (0, 1, 2, 3):
        errors.append(f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    if pp > 1 and p.zero_stage > 1:
        errors.append(f"parallel.zero_stage={p.zero_stage} with parallel.pipeline_parallel={pp}: DeepSpeed's "
                      "pipeline engine supports ZeRO stage 0 or 1 only")
    if m.num_attention_heads % tp:
        errors.append(f"model.num_attention_heads ({m.num_attention_heads}) not divisible by "
                      f"parallel.tensor_parallel ({tp})")
    if m.ffn_hidden_size % tp:
        errors.append(f"model.ffn_hidden_size ({m.ffn_hidden_size}) not divisible by parallel.tensor_parallel ({tp})")
    if m.vocab_size % tp:
        errors.append(f"model.vocab_size ({m.vocab_size}) not divisible by parallel.tensor_parallel ({tp}); "
                      "pad the vocabulary")
    if m.num_layers % pp:
        errors.append(f"model.num_layers ({m.num_layers}) not divisible by parallel.pipeline_parallel ({pp})")
    per_step = t.micro_batch_size * dp
    if t.micro_batch_size < 1 or t.global_batch_size % per_step:
        errors.append(f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                      f"train.micro_batch_size ({t.micro_batch_size}) x data-parallel size ({dp})")
    if t.precision not in ("bf16", "fp32"):
        errors.append(f"train.precision must be 'bf16' or 'fp32' (fp16 is not offered), got {t.precision!r}")
    if t.nan_policy not in ("skip", "stop"):
        errors.append(f"train.nan_policy must be 'skip' or 'stop', got {t.nan_policy!r}")
    if t.nan_policy == "skip" and p.zero_stage == 0:
        errors.append("train.nan_policy=skip relies on ZeRO's skipped step on a non-finite gradient norm: "
                      "use parallel.zero_stage >= 1 or train.nan_policy=stop")
    if not t.lr > 0 or not 0 <= t.min_lr <= t.lr:
        errors.append(f"train.lr ({t.lr}) must be > 0 and train.min_lr ({t.min_lr}) within [0, train.lr]")
    if t.progress_bar not in ("auto", "always", "never"):
        errors.append(f"train.progress_bar must be auto, always or never, got {t.progress_bar!r}")
    if m.backend == "te" and m.te_fused and p.zero_stage == 3:
        errors.append("model.backend=te with model.te_fused=true and parallel.zero_stage=3: the fused modules read "
                      "parameters that ZeRO-3 would not gather for them (model/te_fused.py); use parallel.zero_stage "
                      "<= 2 or model.te_fused=false")
    errors += _fp8_shape_errors(cfg, tp)
    if p.sequence_parallel and tp == 1:
        errors.append("parallel.sequence_parallel=true splits the sequence over the tensor-parallel group: it "
                      "needs parallel.tensor_parallel > 1 (got 1)")
    elif p.sequence_parallel and cfg.data.seq_length % tp:
        errors.append(f"parallel.sequence_parallel=true: data.seq_length ({cfg.data.seq_length}) must be divisible "
                      f"by parallel.tensor_parallel ({tp})")
    if errors:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(errors))
    return Layout(world_size, tp, pp, dp, t.global_batch_size // per_step)


def _fp8_shape_errors(cfg: Config, tp: int) -> list[str]:
    """The FP8 GEMMs' shape rules, checked at start-up instead of failing in the first step's kernel call.
    Transformer Engine (``assert_dim_for_fp8_exec`` on every input and weight): the leading dimensions of an
    operand multiply to a multiple of 8, its last dimension is a multiple of 16. ``torch._scaled_mm`` (torchao):
    the inner dimension and both of the second operand's are multiples of 16; the weight gradient's inner
    dimension is the token count. Training rows only: evaluation and decoding run outside the FP8 region
    (Transformer Engine) or take no weight gradient (torchao)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    if m.fp8 == "none":
        return []
    te = m.fp8 in FP8_TE_RECIPES
    split = tp if p.sequence_parallel and tp > 1 else 1
    rows = cfg.data.seq_length * t.micro_batch_size // split
    multiple = 8 if te else 16
    errors = []
    if rows % multiple:
        per = f" / parallel.tensor_parallel ({tp}, sequence parallel)" if split > 1 else ""
        errors.append(f"model.fp8={m.fp8}: data.seq_length ({cfg.data.seq_length}) x train.micro_batch_size "
                      f"({t.micro_batch_size}){per} = {rows} token rows per GEMM, which must be a multiple of "
                      f"{multiple} ({'Transformer Engine' if te else 'torch._scaled_mm, the weight gradient'})")
    per_rank = f" / parallel.tensor_parallel ({tp})" if tp > 1 else ""
    widths = {"model.hidden_size": m.hidden_size, f"model.ffn_hidden_size{per_rank}": m.ffn_hidden_size // tp}
    if tp > 1:
        widths[f"model.hidden_size{per_rank}"] = m.hidden_size // tp
    errors += [f"model.fp8={m.fp8}: {name} = {width} must be a multiple of 16 (the FP8 GEMMs' inner and output "
               "dimensions)" for name, width in widths.items() if width % 16]
    return errors


def warmup_steps(t: TrainConfig) -> int:
    return t.warmup_steps if t.warmup_steps is not None else int(round(t.warmup_ratio * t.train_steps))
