"""Trainer parameter names <-> the Hugging Face key names of GENLIP_SPEC.md §6.

The only non-trivial mapping is attention: the trainer holds q_proj as two projections ``q`` (query) and
``gate``; the exported ``q_proj`` is ``[2d, d]`` with the query rows first and the gate rows second
(two contiguous halves, not interleaved per head). Everything else is a rename of the block prefix
(``layers.i`` -> ``visual.layers.i``) and ``self_attn.{k,v,o}`` -> ``{k,v,out}_proj``.
Works on full (TP=1, gathered) state dicts.
"""

from __future__ import annotations

import re

import torch

_RENAMES = {"self_attn.k.": "self_attn.k_proj.", "self_attn.v.": "self_attn.v_proj.", "self_attn.o.": "self_attn.out_proj."}


def to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainer state dict (full tensors) -> HF keys and layouts."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name.endswith("_extra_state"):
            continue
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if not m:
            out[name] = t
            continue
        i, rest = m.groups()
        prefix = f"visual.layers.{i}."
        if rest.startswith("self_attn.gate."):
            continue  # merged into q_proj below
        if rest.startswith("self_attn.q."):
            kind = rest.rsplit(".", 1)[1]
            gate = state.get(f"layers.{i}.self_attn.gate.{kind}")
            out[prefix + f"self_attn.q_proj.{kind}"] = t if gate is None else torch.cat((t, gate), dim=0)
            continue
        for old, new in _RENAMES.items():
            if rest.startswith(old):
                rest = new + rest[len(old):]
                break
        out[prefix + rest] = t
    return out


def from_hf(hf: dict[str, torch.Tensor], gated: bool = True) -> dict[str, torch.Tensor]:
    """HF keys -> trainer names (inverse of :func:`to_hf`)."""
    out: dict[str, torch.Tensor] = {}
    inverse = {v: k for k, v in _RENAMES.items()}
    for name, t in hf.items():
        m = re.match(r"visual\.layers\.(\d+)\.(.*)", name)
        if not m:
            out[name] = t
            continue
        i, rest = m.groups()
        prefix = f"layers.{i}."
        if rest.startswith("self_attn.q_proj."):
            kind = rest.rsplit(".", 1)[1]
            if gated:
                q, gate = t.chunk(2, dim=0)
                out[prefix + f"self_attn.q.{kind}"] = q.clone()
                out[prefix + f"self_attn.gate.{kind}"] = gate.clone()
            else:
                out[prefix + f"self_attn.q.{kind}"] = t
            continue
        for new, old in inverse.items():
            if rest.startswith(new):
                rest = old + rest[len(new):]
                break
        out[prefix + rest] = t
    return out
