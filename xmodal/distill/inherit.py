"""Weight inheritance: a smaller student CLIP cut out of a trained teacher (TinyCLIP, Wu et al., ICCV 2023).

TinyCLIP shows that a student initialised with a subset of the teacher's layers and widths trains far
faster than one from scratch. Following its `weight_inherit.py` (microsoft/Cream, TinyCLIP): layers are
picked "interval_front" (`step = L_t // L_s`, indices `0, step, 2·step, …`), every tensor keeps a subset
of its channels, and the fused q/k/v projection is viewed as (3, heads, head_dim, W) so that whole heads
are kept for each of q, k and v. `select="front"` keeps the first channels and heads, exactly TinyCLIP's
manual inheritance. `select="magnitude"` (the default) is a criterion of ours, not TinyCLIP's: it keeps the
residual channels, heads and MLP channels with the largest summed squared weights. TinyCLIP's
learnable-mask inheritance is not implemented. Listed layer indices and `every=K` are ours too.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from xmodal.errors import UserError
from xmodal.fsutil import save_torch_atomic, write_text_atomic

Layers = int | list[int] | None  # a count (interval_front), listed teacher indices, or None (all)
_KEYS = ("layers", "every", "width")
_TOWERS = ("image", "text")


@dataclass
class InheritSpec:
    """What to cut. Layer requests stay raw here; `inherit_student` resolves them against the teacher."""

    teacher: str  # anything xmodal.models.encoder.load_encoder accepts (run dir, open_clip export dir)
    image_layers: Layers = None
    text_layers: Layers = None
    image_every: int | None = None  # every K-th layer from 0 (instead of *_layers)
    text_every: int | None = None
    image_width: float = 1.0  # fraction of attention heads kept
    text_width: float = 1.0
    select: str = "magnitude"  # "magnitude" (ours) | "front" (TinyCLIP's manual inheritance)
    source: str = ""  # the --student text, for messages

    def fail(self, why: str) -> UserError:
        return UserError(f"--student {self.source or 'inherit:' + self.teacher}: {why}")


def parse_inherit(text: str) -> InheritSpec:
    """Parse `inherit:TEACHER:KEY=VALUE,…` (the teacher may contain ':'; the params follow the last one)."""

    def fail(why: str) -> UserError:
        return UserError(f"--student {text}: {why}")

    usage = "give layers=N|I/J/K, every=K and/or width=F, e.g. inherit:RUN_DIR:layers=6,width=0.5"
    if not text.startswith("inherit:"):
        raise fail(f"expected inherit:TEACHER:KEY=VALUE,… ({usage})")
    teacher, sep, params = text[len("inherit:") :].rpartition(":")
    if not sep or "=" not in params:
        raise fail(f"no reduction asked; {usage}")
    if not teacher:
        raise fail("missing teacher; give an xmodal run dir or an open_clip export dir before the params")
    known = [*_KEYS, *(f"{t}_{k}" for t in _TOWERS for k in _KEYS), "select"]
    got: dict[str, str] = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise fail(f"'{item}' is not KEY=VALUE")
        if key not in known:
            raise fail(f"unknown key '{key}'; use one of {', '.join(known)}")
        if key in got:
            raise fail(f"'{key}' is given twice; give it once")
        got[key] = value
    spec = InheritSpec(teacher=teacher, source=text, select=got.get("select", "magnitude"))
    if spec.select not in ("magnitude", "front"):
        raise fail(f"select={spec.select}: use select=magnitude or select=front")
    for tower in _TOWERS:
        for level in (f"{tower}_", ""):  # the per-tower request overrides the shared one
            lk, ek = f"{level}layers", f"{level}every"
            if lk in got and ek in got:
                raise fail(f"give {lk}= or {ek}=, not both")
            if lk in got:
                setattr(spec, f"{tower}_layers", _parse_layers(got[lk], lk, fail))
                break
            if ek in got:
                setattr(spec, f"{tower}_every", _parse_int(got[ek], ek, fail, 1))
                break
        key = f"{tower}_width" if f"{tower}_width" in got else "width"
        if key in got:
            try:
                width = float(got[key])
            except ValueError:
                width = -1.0
            if not 0 < width <= 1:
                raise fail(f"{key}={got[key]}: give a fraction of the heads in (0, 1], e.g. 0.5")
            setattr(spec, f"{tower}_width", width)
    return spec


def _parse_int(value: str, key: str, fail, low: int) -> int:
    if not (value.isascii() and value.isdigit()) or int(value) < low:
        raise fail(f"{key}={value}: give a whole number ≥ {low}")
    return int(value)


def _parse_layers(value: str, key: str, fail) -> int | list[int]:
    if "/" not in value:
        return _parse_int(value, key, fail, 1)
    idx = [_parse_int(v, key, fail, 0) for v in value.split("/")]
    if any(b <= a for a, b in zip(idx, idx[1:], strict=False)):
        raise fail(f"{key}={value}: list teacher layer indices once each, in increasing order")
    return idx


# Which axes of each tensor index the residual width (R), kept heads' channels (H), q/k/v rows (Q) or MLP
# channels (M); None = copied whole. Keys are relative to the tower; block keys to its resblocks.{i}.
_RES = ("R",)
_TOWER_AXES: dict[str, dict[str, tuple]] = {
    "image": {
        "conv1.weight": ("R", None, None, None),
        "class_embedding": _RES,
        "positional_embedding": (None, "R"),
        **{f"{ln}.{p}": _RES for ln in ("ln_pre", "ln_post") for p in ("weight", "bias")},
        "proj": ("R", None),
    },
    "text": {
        "token_embedding.weight": (None, "R"),
        "positional_embedding": (None, "R"),
        "cls_emb": _RES,
        "ln_final.weight": _RES,
        "ln_final.bias": _RES,
        "text_projection": ("R", None),  # a Parameter [W, D] …
        "text_projection.weight": (None, "R"),  # … or an nn.Linear (proj_bias=True)
        "text_projection.bias": (None,),
    },
}
_BLOCK_AXES: dict[str, tuple] = {
    **{f"{ln}.{p}": _RES for ln in ("ln_1", "ln_2") for p in ("weight", "bias")},
    "attn.in_proj_weight": ("Q", "R"),
    "attn.in_proj_bias": ("Q",),
    "attn.out_proj.weight": ("R", "H"),
    "attn.out_proj.bias": _RES,
    "mlp.c_fc.weight": ("M", "R"),
    "mlp.c_fc.bias": ("M",),
    "mlp.c_proj.weight": ("R", "M"),
    "mlp.c_proj.bias": _RES,
}
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_CUSTOM_BLOCK = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")


def _refuse_unsupported(cfg: dict[str, Any], spec: InheritSpec) -> None:
    vc, tc = cfg["vision_cfg"], cfg["text_cfg"]
    reasons = {
        "a CoCa model (multimodal_cfg)": "multimodal_cfg" in cfg,
        "xmodal fusion heads": "fusion" in cfg or "tgmim" in cfg,
        "a Hugging Face text tower": "hf_model_name" in tc,
        "a timm image tower": bool(vc.get("timm_model_name")),
        "a ResNet image tower": not isinstance(vc.get("layers", 12), int),
        "attentional pooling": bool(vc.get("attentional_pool")),
        "layer scale (ls_init_value)": any(c.get("ls_init_value") is not None for c in (vc, tc)),
        "custom attention blocks": any(c.get("block_type") not in (None, "default") for c in (vc, tc))
        or any(c.get(k) for c in (vc, tc) for k in _CUSTOM_BLOCK),
    }
    for what, hit in reasons.items():
        if hit:
            raise spec.fail(
                f"the teacher has {what}; weight inheritance supports open_clip ViT + text transformer CLIPs"
            )


def _resolve_layers(spec: InheritSpec, tower: str, depth: int) -> list[int]:
    req, every = getattr(spec, f"{tower}_layers"), getattr(spec, f"{tower}_every")
    if every is not None:
        return list(range(0, depth, every))
    if req is None:
        return list(range(depth))
    if isinstance(req, int):
        if req > depth:
            raise spec.fail(f"{tower} layers={req}, but the teacher's {tower} tower has {depth} layers")
        step = depth // req  # TinyCLIP's interval_front
        return list(range(0, req * step, step))
    if req[-1] >= depth:
        raise spec.fail(
            f"{tower} layer {req[-1]} is out of range; the teacher's {tower} tower has layers 0…{depth - 1}"
        )
    return list(req)


def _top(score: torch.Tensor | None, n: int) -> torch.Tensor:
    """Indices of the n largest scores in ascending order; the first n when score is None (front)."""
    if score is None:
        return torch.arange(n)
    return torch.topk(score, n).indices.sort().values


def _sq(t: torch.Tensor, axis: int) -> torch.Tensor:
    """Sum of squares over every axis but `axis`."""
    other = [d for d in range(t.dim()) if d != axis]
    return t.double().pow(2).sum(dim=other) if other else t.double().pow(2)  # sum(dim=[]) sums all


def _slice(t: torch.Tensor, axes: tuple, index: dict[str, torch.Tensor]) -> torch.Tensor:
    for dim, kind in enumerate(axes):
        if kind is not None:
            t = t.index_select(dim, index[kind])
    return t.clone()


def inherit_from_model(
    model: torch.nn.Module, model_cfg: dict[str, Any], spec: InheritSpec
) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Cut the student out of a loaded teacher: (student config, student state dict, what was kept)."""
    _refuse_unsupported(model_cfg, spec)
    state = model.state_dict()
    text_prefix = "text." if any(k.startswith("text.") for k in state) else ""
    groups: dict[str, dict[str, Any]] = {t: {"plain": {}, "blocks": {}} for t in _TOWERS}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in ("logit_scale", "logit_bias"):
            out[key] = value.clone()
            continue
        tower, prefix = ("image", "visual.") if key.startswith("visual.") else ("text", text_prefix)
        rest = key[len(prefix) :] if key.startswith(prefix) else ""
        if (m := _BLOCK.fullmatch(rest)) and m[2] in _BLOCK_AXES:
            groups[tower]["blocks"].setdefault(int(m[1]), {})[m[2]] = value
        elif rest in _TOWER_AXES[tower]:
            groups[tower]["plain"][rest] = value
        else:
            raise spec.fail(
                f"the teacher has weights xmodal cannot slice ({key}); it is not an open_clip ViT CLIP"
            )

    cfg = copy.deepcopy(model_cfg)
    record: dict[str, Any] = {"teacher": str(spec.teacher), "select": spec.select}
    for tower, cfg_key, prefix in (("image", "vision_cfg", "visual."), ("text", "text_cfg", text_prefix)):
        plain, blocks = groups[tower]["plain"], groups[tower]["blocks"]
        depth = len(blocks)
        if (
            depth == 0
            or sorted(blocks) != list(range(depth))
            or any(b.keys() != _BLOCK_AXES.keys() for b in blocks.values())
        ):
            raise spec.fail(f"the teacher's {tower} tower has no complete resblocks 0…N-1 to inherit from")
        tcfg = cfg[cfg_key]
        dc = CLIPVisionCfg(**tcfg) if tower == "image" else CLIPTextCfg(**tcfg)
        width = blocks[0]["ln_1.weight"].shape[0]
        heads = width // dc.head_width if tower == "image" else dc.heads
        if heads < 1 or width % heads:
            raise spec.fail(f"the teacher's {tower} width {width} does not split into {heads} heads")
        head_dim = width // heads
        fraction = getattr(spec, f"{tower}_width")
        kept = fraction * heads
        if abs(kept - round(kept)) > 1e-6 or round(kept) < 1:
            fractions = ", ".join(f"{k / heads:g}" for k in range(1, heads + 1))
            raise spec.fail(
                f"{tower} width={fraction:g} keeps {kept:g} of {heads} heads; "
                f"give a fraction that keeps whole heads ({fractions})"
            )
        n_heads, layers = round(kept), _resolve_layers(spec, tower, depth)
        s_width = n_heads * head_dim
        s_mlp = int(s_width * dc.mlp_ratio)  # open_clip derives the MLP width from mlp_ratio
        magnitude = spec.select == "magnitude"

        tensors = [(plain[k], _TOWER_AXES[tower][k]) for k in plain]
        tensors += [(blocks[i][k], _BLOCK_AXES[k]) for i in layers for k in blocks[i]]
        r_score = sum(_sq(t, axes.index("R")) for t, axes in tensors if "R" in axes) if magnitude else None
        residual = _top(r_score, s_width)
        for k, v in plain.items():
            out[prefix + k] = _slice(v, _TOWER_AXES[tower][k], {"R": residual})
        record_heads = []
        for new, old in enumerate(layers):
            b = blocks[old]
            qkv_w, qkv_b = b["attn.in_proj_weight"], b["attn.in_proj_bias"]
            h_score = m_score = None
            if magnitude:
                h_score = _sq(qkv_w.view(3, heads, head_dim, width), 1)  # q, k and v rows of each head
                h_score += _sq(qkv_b.view(3, heads, head_dim), 1)
                h_score += _sq(b["attn.out_proj.weight"].view(width, heads, head_dim), 1)  # its columns
                m_score = _sq(b["mlp.c_fc.weight"], 0) + _sq(b["mlp.c_fc.bias"], 0)
                m_score += _sq(b["mlp.c_proj.weight"], 1)
            kept_heads = _top(h_score, n_heads)
            channels = (kept_heads[:, None] * head_dim + torch.arange(head_dim)).flatten()
            index = {
                "R": residual,
                "H": channels,
                "Q": torch.cat([part * width + channels for part in range(3)]),
                "M": _top(m_score, s_mlp),
            }
            for k, v in b.items():
                out[f"{prefix}transformer.resblocks.{new}.{k}"] = _slice(v, _BLOCK_AXES[k], index)
            record_heads.append(kept_heads.tolist())
        tcfg.update(layers=len(layers), width=s_width)
        if tower == "text":
            tcfg["heads"] = n_heads
        elif head_dim != dc.head_width:
            tcfg["head_width"] = head_dim
        record[tower] = {"layers": layers, "heads": record_heads, "residual": residual.tolist()}
    return cfg, out, record


def _load_teacher(spec: InheritSpec):
    from xmodal.models.encoder import load_encoder

    if not Path(spec.teacher).exists():
        raise spec.fail(
            f"teacher {spec.teacher} not found; give an xmodal run dir or an open_clip export dir "
            "(model.json + open_clip_model.pt)"
        )
    encoder = load_encoder(spec.teacher, device="cpu")
    return encoder.model, encoder.model_cfg


def inherit_student(spec: InheritSpec) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(student open_clip config, student state dict) inherited from the teacher at `spec.teacher`."""
    cfg, state, _ = inherit_from_model(*_load_teacher(spec), spec)
    return cfg, state


def write_student(spec: InheritSpec, out_dir: Path) -> tuple[Path, Path]:
    """Write out_dir/weights.pt, out_dir/inherit.json (what was kept) and out_dir/model.json (last)."""
    cfg, state, record = inherit_from_model(*_load_teacher(spec), spec)
    record["teacher"] = str(Path(spec.teacher).resolve())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_json, weights = out_dir / "model.json", out_dir / "weights.pt"
    save_torch_atomic(state, weights)
    write_text_atomic(out_dir / "inherit.json", json.dumps(record, indent=1) + "\n")
    write_text_atomic(model_json, json.dumps(cfg, indent=2) + "\n")
    return model_json, weights
