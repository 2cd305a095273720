"""GenLIP: one transformer reads [image patches][prompt][caption] and predicts the caption (GENLIP_SPEC.md §2).

The input is a packed micro-batch as ``megatron_genlip.batch`` defines it (token ids, labels, 3-axis positions,
sample ids, token kinds per slot; uint8 image patches). The model is written for one device: tensor parallelism
enters through the classes of the layer spec (``model/spec.py``), sequence parallelism through the one wrapper
``parallel.sequence.SequenceParallel`` around the blocks, pipeline parallelism through the stages of
``model/stages.py``, which reuse the embedding and head mixins below.

Import direction: the model builds on the parallel primitives (``megatron_genlip.parallel``: process groups, RNG
streams, sequence parallelism), as megatron-core's transformer builds on its ``tensor_parallel``; nothing in
``megatron_genlip.parallel`` imports the model, and the model imports no data code (the batch format is shared
through ``megatron_genlip.batch``).

Module names follow the Hugging Face keys of GENLIP_SPEC.md §6 where they can (``vision_embeddings``,
``layers``, ``ln_post``, ``embeddings``, ``in_proj``, ``proj``, ``lm_head``); q_proj is held as ``q`` + ``gate``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

from megatron_genlip.batch import KIND_IMAGE, normalize_pixels, predicts_label
from megatron_genlip.config import ModelConfig
from megatron_genlip.model import recompute
from megatron_genlip.model.layers import KVCache, TransformerBlock, normal_init
from megatron_genlip.model.rope import MultimodalRotaryEmbedding
from megatron_genlip.model.spec import get_layer_spec, parallel_config
from megatron_genlip.parallel import rng, state
from megatron_genlip.parallel.sequence import SequenceParallel


@dataclass
class LossOutput:
    """Token-mean loss over the micro-batch plus what is needed to split it per sample."""

    loss: torch.Tensor  # scalar: mean over labelled tokens (GENLIP_SPEC.md §2.9)
    token_losses: torch.Tensor  # [N_lab] per labelled target
    token_rows: torch.Tensor  # [N_lab] row index of each target
    token_sample_ids: torch.Tensor  # [N_lab] packed-sample id of each target

    @property
    def num_tokens(self) -> int:
        return self.token_losses.numel()


class PatchEmbedding(torch.nn.Module):
    """Conv2d(C -> d, kernel = stride = patch) on one patch, i.e. a linear map of the flattened (c, y, x) patch.

    Parameters have the Conv2d shapes ([d, C, p, p] and [d]) and names of the official checkpoints; the
    module owns its forward so ZeRO-3 gathers its parameters when it runs.
    """

    def __init__(self, channels: int, hidden: int, patch: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(hidden, channels, patch, patch))
        self.bias = torch.nn.Parameter(torch.empty(hidden))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, C, p, p] -> [N, d]; uint8 pixels (what the data path ships) are normalised here, on
        the device, exactly as the host-side reference does."""
        if patches.dtype == torch.uint8:
            patches = normalize_pixels(patches)
        return F.linear(patches.to(self.weight.dtype).flatten(1), self.weight.flatten(1), self.bias)


class VisionEmbeddings(torch.nn.Module):
    """Patch embedding only: no position embedding, no CLS token, no pre-norm (GENLIP_SPEC.md §2.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.patch_embedding = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches)


@contextlib.contextmanager
def component_rng(seed: int, index: int):
    """Initialise one model component from its own RNG stream, so every layout (TP, PP stage split) builds
    bit-identical weights: component 0 = embeddings, 1..L = blocks, L+1 = head. Only the CPU generator, where
    the weights are drawn (``use_cpu_initialization``), is seeded and restored: ``torch.manual_seed`` would also
    reseed every CUDA generator, which ``fork_rng(devices=[])`` does not restore, so a model built mid-run (the
    ZeRO-3 evaluation copy) would reset DropPath's CUDA stream to the same state on every data-parallel rank."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed * 100_003 + index)
        yield


class EmbeddingMixin:
    """Patch embedding, text embedding and in_proj; shared by the model and the first pipeline stage."""

    def _build_embedding(self, cfg: ModelConfig, spec, pconfig, tp_group) -> None:
        d, e = cfg.hidden_size, cfg.text_embed_dim
        self.vision_embeddings = VisionEmbeddings(cfg)
        self.embeddings = spec.vocab_embedding(cfg.vocab_size, e, init_method=normal_init(cfg.init_std),
                                               config=pconfig, tp_group=tp_group)
        self.in_proj = torch.nn.Linear(e, d) if e != d else None
        with torch.no_grad():  # §2.10 for what megatron-core does not initialise
            torch.nn.init.normal_(self.vision_embeddings.patch_embedding.weight, std=cfg.init_std)
            self.vision_embeddings.patch_embedding.bias.zero_()
            if self.in_proj is not None:
                torch.nn.init.normal_(self.in_proj.weight, std=cfg.init_std)
                self.in_proj.bias.zero_()

    def embed(self, input_ids: torch.Tensor, token_kinds: torch.Tensor, patches: torch.Tensor | None) -> torch.Tensor:
        """Text embedding of every slot, then image-patch embeddings scattered over image slots: [L, B, d]."""
        x = self.embeddings(input_ids)
        if self.in_proj is not None:
            x = self.in_proj(x)
        image_slots = token_kinds == KIND_IMAGE
        if patches is not None and patches.shape[0] > 0:
            img = self.vision_embeddings(patches).to(x.dtype)
            slots = image_slots.sum()
            if slots.device.type == "cpu":
                if img.shape[0] != int(slots):
                    raise ValueError(f"{img.shape[0]} patches for {int(slots)} image slots")
            else:  # checked on the device, without waiting for it (a host read would stall every micro-batch)
                torch._assert_async(slots == img.shape[0], "the micro-batch's patches do not match its image slots")
            x = x.masked_scatter(image_slots[..., None], img)
        return x.transpose(0, 1).contiguous()


def select_labelled(h: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slots whose next slot carries a label (``batch.predicts_label``; no pair crosses samples): their
    hidden states [N_lab, d], their targets [N_lab] and the selection bool [B, L-1]. h is [B, L, d]."""
    selected = predicts_label(labels)
    return h[:, :-1][selected], labels[:, 1:][selected], selected


class HeadMixin:
    """ln_post, proj, the LM head and the loss; shared by the model and the last pipeline stage."""

    def _build_head(self, cfg: ModelConfig, spec, pconfig, tp_group) -> None:
        d, e = cfg.hidden_size, cfg.text_embed_dim
        self.ln_post = spec.layer_norm(d, eps=cfg.layernorm_eps)
        self.proj = torch.nn.Linear(d, e) if e != d else None
        self.lm_head = spec.lm_head(e, cfg.vocab_size, bias=False, init_method=normal_init(cfg.init_std),
                                    config=pconfig, tp_group=tp_group)
        self.lm_head.loss_tp_group = tp_group  # its vocabulary shard's group, for the fused loss
        self.loss_chunk_size = cfg.loss_chunk_size  # labelled positions per LM-head chunk (0: all at once)
        self.loss_impl = cfg.loss_impl  # "fused" (model/fused_loss.py) | "reference"
        if self.proj is not None:
            with torch.no_grad():
                torch.nn.init.normal_(self.proj.weight, std=cfg.init_std)
                self.proj.bias.zero_()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """proj + lm_head: [..., d] -> vocab logits (the local vocab shard under TP)."""
        if self.proj is not None:
            h = self.proj(h)
        return self.lm_head(h)

    def _token_losses(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy [N] of hidden states h [N, d] against targets [N]; vocab-parallel under TP."""
        logits = self.head(h).float()  # [N, V/TP]
        return vocab_parallel_cross_entropy(logits[None], targets[None])[0]

    def loss_from_hidden(self, h: torch.Tensor, labels: torch.Tensor, sample_ids: torch.Tensor) -> LossOutput:
        """Next-token loss from ln_post output h [B, L, d]; the LM head runs only where a label follows.

        ``model.loss_impl=fused`` (the default): proj, then the LM head and cross-entropy in one pass, gradients
        computed in the forward (``model/fused_loss.py``), ``model.loss_chunk_size`` positions at a time.
        ``reference``: with ``model.loss_chunk_size`` = C > 0 the labelled positions go through proj, the LM head
        and the cross-entropy C at a time, each chunk recomputed in backward (non-reentrant checkpoint), so at most
        one chunk's [C, V/TP] logits (and their gradient) exist at any moment instead of [N_lab, V/TP].
        """
        hidden, target, selected = select_labelled(h, labels)
        chunk = self.loss_chunk_size
        rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(selected)[selected]
        if self.loss_impl == "fused":
            if self.proj is not None:
                hidden = self.proj(hidden)
            loss, token_losses = self.lm_head(hidden, targets=target, chunk=chunk)
            return LossOutput(loss, token_losses, rows, sample_ids[:, 1:][selected])
        if chunk <= 0 or hidden.shape[0] <= chunk:
            token_losses = self._token_losses(hidden, target)
        else:
            token_losses = torch.cat([
                torch.utils.checkpoint.checkpoint(self._token_losses, hidden[i:i + chunk], target[i:i + chunk],
                                                  use_reentrant=False)
                for i in range(0, hidden.shape[0], chunk)
            ])
        loss = token_losses.mean() if token_losses.numel() else h.sum() * 0.0
        return LossOutput(loss, token_losses, rows, sample_ids[:, 1:][selected])


class GenLIPModel(EmbeddingMixin, HeadMixin, torch.nn.Module):
    """The whole model on one pipeline stage. ``tp_group`` is the tensor-parallel process group (None: no
    tensor parallelism, e.g. the meta-device model of ``--dry-run``); the constructor creates no process group and
    patches nothing (:func:`build_model` makes a runnable one, groups included)."""

    def __init__(self, cfg: ModelConfig, tp_group=None, seed: int = 0, sequence_parallel: bool = False):
        super().__init__()
        tensor_parallel = state.group_size(tp_group)
        self.cfg = cfg
        self.sp = SequenceParallel(tp_group, sequence_parallel)  # blocks run on sequence slices when enabled
        self.activation_checkpointing = "none"  # none | selective | full (model/recompute.py; set by the trainer)
        spec = get_layer_spec(cfg)
        self.fp8_region = spec.fp8_region  # Transformer Engine FP8: one autocast region around the blocks
        pconfig = parallel_config(cfg, tensor_parallel, sequence_parallel)
        with component_rng(seed, 0):
            self._build_embedding(cfg, spec, pconfig, tp_group)
        self.rotary = MultimodalRotaryEmbedding(cfg.head_dim, cfg.mrope_section, cfg.rope_theta)
        layers = []
        for i in range(cfg.num_layers):
            with component_rng(seed, 1 + i):
                layers.append(TransformerBlock(cfg, spec, pconfig, tp_group, i))
        self.layers = torch.nn.ModuleList(layers)
        with component_rng(seed, cfg.num_layers + 1):  # the head runs on gathered, full-length hidden states
            self._build_head(cfg, spec, parallel_config(cfg, tensor_parallel), tp_group)
        self.to(getattr(torch, cfg.params_dtype))

    def encode(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
               cache: KVCache | None = None) -> torch.Tensor:
        """Blocks and ln_post. x [L, B, d] (full length); positions [B, 3, L]; mask bool [B|1, 1, L, L_kv].
        Under sequence parallelism the blocks run on this rank's L/TP slice (rotary tables and mask stay full
        length: attention sees the whole sequence) and the output is gathered before ln_post."""
        cos, sin = self.rotary(positions, x.dtype)
        mode = recompute.normalize(self.activation_checkpointing) if self.training and cache is None else "none"
        if self.training:
            rng.check_replicated()  # DropPath draws from the default generators, outside any per-rank fork
        # FP8 (Transformer Engine) in training only: evaluation, feature extraction and decoding run in bf16, as
        # the exported encoder does downstream (and TE's FP8 GEMMs need row counts in multiples of 8, which a
        # decoding step of one caption per row is not)
        region = self.fp8_region if self.training else None
        with self.sp.region(self, x.shape[0], cache is not None) as sp, \
                (region() if region is not None else contextlib.nullcontext()):
            x = sp.scatter(x)
            for layer in self.layers:  # checkpointed: the RNG streams are replayed, DropPath drops the same rows
                x = recompute.run_block(layer, mode, x, cos, sin, mask, cache, region=region)
            x = sp.gather(x)
        return self.ln_post(x)

    # ----------------------------------------------------------------------------------------------
    # training / evaluation entry points

    def final_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """ln_post output for every slot of a packed batch: [B, L, d]."""
        x = self.embed(batch["input_ids"], batch["token_kinds"], batch.get("patches"))
        # the mask the layers' attention kernel takes (dense bool: sdpa, BlockMask: flex), built once for all layers
        mask = self.layers[0].self_attn.kernel.build_mask(batch["sample_ids"], batch["token_kinds"])
        return self.encode(x, batch["positions"], mask).transpose(0, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> LossOutput:
        """Next-token loss; the LM head runs only on positions whose next token carries a label (§2.9)."""
        return self.loss_from_hidden(self.final_hidden(batch), batch["labels"], batch["sample_ids"])

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for every slot [B, L, V/TP] (tests and export parity; training never builds these)."""
        return self.head(self.final_hidden(batch))


def build_model(cfg: ModelConfig, tensor_parallel: int = 1, seed: int | None = None,
                sequence_parallel: bool = False) -> GenLIPModel:
    """Build a runnable model with the §2.10 init on megatron-core's tensor-parallel group (a single process gets a
    world of one); ``seed`` makes the weights identical on every rank and layout (None: a seed drawn from torch's
    RNG). ``sequence_parallel`` needs ``tensor_parallel`` > 1."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    state.ensure_initialized(tensor_parallel)
    return GenLIPModel(cfg, state.tensor_parallel_group(), seed, sequence_parallel)
