"""Objectives by name: each loss family registers classes here; the trainer composes them by weight.

An objective has a name, a one-line description, the paper it comes from, a typed parameter dataclass,
what it needs from the model (`needs`), and whether it works on the cached pooled features of GradCache
accumulation. Called on a `Features` batch it returns a dict of named loss terms.

Data parallelism: `Features` holds this rank's rows and the global batch gathered *with* gradients. Each
term a rank returns must average over the ranks to the global batch's loss — a mean over the rank's own
rows (CLIP), or the global-batch value itself computed on every rank (uniformity). The trainer averages
gradients over ranks, which then gives exactly the single-process gradient.

Spec grammar (`--objective`): `NAME[:WEIGHT][(KEY=VALUE,...)]` joined by `+`, e.g.
`clip+uniformity:0.1(t=3)`. YAML:
`objectives: [{name: clip}, {name: uniformity, weight: 0.1, params: {t: 2}}]`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from xmodal.errors import UserError

NEEDS = (
    "pooled",
    "tokens",
    "labels",
    "momentum",
    "teacher",
    "fusion",
    "caption",
)  # what an objective may ask of the model


@dataclass
class Features:
    """One training step's features: this rank's rows (L2-normalised, float32) and the global batch."""

    image: torch.Tensor  # b×D
    text: torch.Tensor  # b×D
    all_image: torch.Tensor  # B×D, gathered with gradients (== image in one process)
    all_text: torch.Tensor
    offset: int  # row i here is row offset+i of the global batch
    logit_scale: torch.Tensor  # the temperature, exp() already applied
    logit_bias: torch.Tensor | None = None
    labels: torch.Tensor | None = None  # b class ids, -1 = unlabelled
    all_labels: torch.Tensor | None = None  # B
    # Given only to objectives that declare the need. No gradient flows into momentum or teacher features.
    momentum_image: torch.Tensor | None = None  # b×D, the EMA model's features of the same batch
    momentum_text: torch.Tensor | None = None
    all_momentum_image: torch.Tensor | None = None  # B×D
    all_momentum_text: torch.Tensor | None = None
    teacher_image: torch.Tensor | None = None  # b×D, the frozen teacher's features (the initial model)
    teacher_text: torch.Tensor | None = None
    all_teacher_image: torch.Tensor | None = None  # B×D
    all_teacher_text: torch.Tensor | None = None
    teacher_logit_scale: torch.Tensor | None = None  # the teacher's temperature, exp() applied (distillation)
    feature_proj: Any = None  # the model's learned map into the teacher's space, when dimensions differ
    hash_heads: Any = None  # the model's HashHeads (xmodal.hashing.heads), for dcmh/bebr
    image_tokens: torch.Tensor | None = None  # b×N×D, patch tokens in the joint space, L2-normalised
    text_tokens: torch.Tensor | None = None  # b×L×D
    text_mask: torch.Tensor | None = None  # b×L bool, True on real (non-padding) tokens
    step: int = 0  # the optimiser step (for schedules such as ALBEF's α warm-up)
    fusion: Any = None  # a `FusionBatch` (hidden states, the model's fusion encoder), for itm/mlm/mod
    caption: Any = None  # a `CaptionOut` (decoder logits at counted labels, TG-MIM), for caption/tgmim

    @classmethod
    def gather(
        cls,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **extra: Any,
    ) -> Features:
        """Gather this rank's rows into the global batch: pooled features with gradients, labels and the
        momentum/teacher features (`extra`, local b×D each) without."""
        image, text = image.float(), text.float()
        all_labels = gather(labels) if labels is not None else None
        for kind in ("momentum", "teacher"):
            for side in ("image", "text"):
                x = extra.get(f"{kind}_{side}")
                if x is not None:
                    extra[f"{kind}_{side}"] = x = x.float().detach()
                    extra[f"all_{kind}_{side}"] = gather(x)
        return cls(
            image,
            text,
            gather_with_grad(image),
            gather_with_grad(text),
            _rank() * len(image),
            logit_scale,
            logit_bias,
            labels,
            all_labels,
            **extra,
        )


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks in rank order; gradients flow back to every rank's slice
    (the backward of an all-gather is a reduce-scatter of the gradients)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed._functional_collectives import all_gather_tensor_autograd

    return all_gather_tensor_autograd(x.contiguous(), gather_dim=0, group=dist.group.WORLD)


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (labels: no gradient) from all ranks in rank order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = x.new_empty((dist.get_world_size() * len(x), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@dataclass
class NoParams:
    pass


class Objective:
    """Base class. Subclasses set the class attributes and implement `terms`."""

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str]
    Params: ClassVar[type] = NoParams
    needs: ClassVar[frozenset[str]] = frozenset({"pooled"})
    supports_accumulation: ClassVar[bool] = True  # computable from cached pooled features
    model_init: ClassVar[dict[str, Any]] = {}  # model config defaults it wants (SigLIP's bias)

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()

    def bind(self, others: Sequence[Objective]) -> None:
        """Called once with every objective of the composite (itself included): an objective whose
        behaviour depends on another's (mlm distilled when mod is there) looks it up here."""

    def terms(self, f: Features) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # Stateful objectives (feature queues) override these three; the trainer calls `commit` once after
    # each optimiser step and keeps `state_dict` in the checkpoint, so that a resume is exact.
    def commit(self) -> None:
        """The step is done: apply what `terms` staged (e.g. enqueue this batch's momentum features)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"objective {self.name} keeps no state, but the checkpoint has some")

    @property
    def ema_decay(self) -> float | None:
        """For objectives that need the momentum model: the EMA decay the trainer updates it with."""
        return None

    @property
    def ema_anchor(self) -> float:
        """The share a of the EMA's update taken from the frozen previous model instead of the live one,
        θ_m ← m·θ_m + (1 − m)(1 − a)·θ + (1 − m)·a·θ_teacher (CTP's compatible momentum; 0 = plain EMA)."""
        return 0.0


REGISTRY: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make `cls` available by `cls.name`."""
    assert dataclasses.is_dataclass(cls.Params), cls
    assert cls.needs <= set(NEEDS), cls.needs
    REGISTRY[cls.name] = cls
    return cls


def _loaded() -> dict[str, type[Objective]]:
    """REGISTRY with every family imported (they register on import; `xmodal.objectives` loads lazily)."""
    from xmodal.objectives import load_families

    load_families()
    return REGISTRY


def _known() -> str:
    return ", ".join(sorted(_loaded()))


@dataclass
class ObjectiveSpec:
    name: str
    weight: float = 1.0
    params: dict[str, Any] = dataclasses.field(default_factory=dict)


_TERM = re.compile(r"^\s*([A-Za-z][\w-]*)\s*(?::\s*([-+0-9.eE]+))?\s*(?:\((.*)\))?\s*$")


def parse_spec(text: str) -> list[ObjectiveSpec]:
    """`clip+uniformity:0.1(t=3)` → specs; a UserError naming --objective for anything malformed."""
    specs = []
    for part in text.split("+"):
        m = _TERM.match(part)
        if not m:
            raise UserError(f"--objective {text}: {part.strip()!r} is not NAME[:WEIGHT][(KEY=VALUE,...)]")
        name, weight, params = m.groups()
        kv: dict[str, Any] = {}
        for item in filter(None, (x.strip() for x in (params or "").split(","))):
            key, eq, value = item.partition("=")
            if not eq:
                raise UserError(f"--objective {text}: parameter {item!r} is not KEY=VALUE")
            kv[key.strip()] = value.strip()
        try:
            w = float(weight) if weight is not None else 1.0
        except ValueError:
            raise UserError(f"--objective {text}: weight {weight!r} is not a number") from None
        specs.append(ObjectiveSpec(name, w, kv))
    return specs


def specs_from(value: str | Sequence[Any]) -> list[ObjectiveSpec]:
    """The config's `objective`: a spec string, or (from YAML) a list of {name, weight, params} / names."""
    if isinstance(value, str):
        return parse_spec(value)
    specs = []
    for item in value:
        if isinstance(item, str):
            specs += parse_spec(item)
        elif isinstance(item, dict) and set(item) <= {"name", "weight", "params"} and "name" in item:
            specs.append(
                ObjectiveSpec(
                    str(item["name"]), float(item.get("weight", 1.0)), dict(item.get("params") or {})
                )
            )
        else:
            raise UserError(f"objectives: {item!r} is not {{name, weight, params}}")
    return specs


def _convert(cls: type[Objective], key: str, value: Any) -> Any:
    field = {f.name: f for f in dataclasses.fields(cls.Params)}[key]
    typ = (
        field.type
        if isinstance(field.type, type)
        else {"float": float, "int": int, "bool": bool, "str": str}.get(str(field.type), str)
    )
    if typ is bool and isinstance(value, str):
        if value.lower() not in ("true", "false"):
            raise ValueError(value)
        return value.lower() == "true"
    return typ(value)


def build(specs: Sequence[ObjectiveSpec]) -> list[tuple[Objective, float]]:
    """Instantiate the objectives; unknown names or parameters are one-line errors listing what exists."""
    if not specs:
        raise UserError(f"--objective: give at least one objective ({_known()})")
    out = []
    for s in specs:
        cls = _loaded().get(s.name)
        if cls is None:
            raise UserError(f"--objective {s.name}: unknown objective; use one of {_known()}")
        allowed = [f.name for f in dataclasses.fields(cls.Params)]
        bad = sorted(set(s.params) - set(allowed))
        if bad:
            raise UserError(
                f"--objective {s.name}: no parameter {', '.join(bad)}; "
                f"it takes {', '.join(allowed) or 'none'}"
            )
        try:
            params = cls.Params(**{k: _convert(cls, k, v) for k, v in s.params.items()})
        except (TypeError, ValueError) as e:
            raise UserError(f"--objective {s.name}: bad parameter value ({e})") from None
        out.append((cls(params), s.weight))
    names = [o.name for o, _ in out]
    if len(set(names)) != len(names):
        raise UserError(f"--objective: {names} names an objective twice; give each once with its weight")
    return out


class Composite:
    """The weighted sum of several objectives; `__call__` returns (total loss, {term: value})."""

    def __init__(self, objectives: Sequence[tuple[Objective, float]]) -> None:
        self.objectives = list(objectives)
        self._names: dict[str, list[str]] = {}  # objective → the names of its terms
        for o, _ in self.objectives:
            o.bind([x for x, _ in self.objectives])

    @classmethod
    def from_config(cls, value: str | Sequence[Any]) -> Composite:
        return cls(build(specs_from(value)))

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(o.needs for o, _ in self.objectives))

    @property
    def model_init(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for o, _ in self.objectives:
            out.update(o.model_init)
        return out

    def unsupported_with_accumulation(self) -> list[str]:
        return [o.name for o, _ in self.objectives if not o.supports_accumulation]

    def __call__(
        self,
        image: torch.Tensor,
        text: torch.Tensor,
        logit_scale: torch.Tensor,
        logit_bias: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **extra: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`extra`: the Features fields the objectives asked for (momentum_image, …, image_tokens, step)."""
        f = Features.gather(image, text, logit_scale, logit_bias, labels, **extra)
        terms = self.objectives_terms(f)
        weights = {name: w for o, w in self.objectives for name in self._names[o.name]}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms

    def objectives_terms(self, f: Features) -> dict[str, torch.Tensor]:
        """Every objective's unweighted terms for the features `f`."""
        terms: dict[str, torch.Tensor] = {}
        for obj, _ in self.objectives:
            parts = obj.terms(f)
            self._names[obj.name] = list(parts)
            clash = set(parts) & set(terms)
            if clash:
                raise ValueError(f"objective {obj.name} returns terms {sorted(clash)} that another one has")
            terms.update(parts)
        return terms

    @property
    def ema_decay(self) -> float | None:
        decays = {o.ema_decay for o, _ in self.objectives} - {None}
        if len(decays) > 1:
            raise UserError(f"--objective: the momentum objectives ask for different decays {sorted(decays)}")
        return decays.pop() if decays else None

    @property
    def ema_anchor(self) -> float:
        anchors = {o.ema_anchor for o, _ in self.objectives if o.ema_decay is not None}
        if len(anchors) > 1:
            raise UserError(
                f"--objective: the momentum objectives share one EMA model but ask for different anchors on "
                f"the old model {sorted(anchors)}; keep one of them (or give ctp anchor=0)"
            )
        return anchors.pop() if anchors else 0.0

    def commit(self) -> None:
        for o, _ in self.objectives:
            o.commit()

    def state_dict(self) -> dict[str, Any]:
        return {o.name: s for o, _ in self.objectives if (s := o.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for o, _ in self.objectives:
            o.load_state_dict(state.get(o.name, {}))


def describe() -> list[dict[str, Any]]:
    """One row per registered objective, for `xmodal objectives`."""
    rows = []
    for name in sorted(_loaded()):
        cls = REGISTRY[name]
        params = [f"{f.name}={f.default}" for f in dataclasses.fields(cls.Params)]
        rows.append(
            {
                "name": name,
                "description": cls.description,
                "params": params,
                "paper": cls.paper,
                "needs": sorted(cls.needs),
                "accumulation": cls.supports_accumulation,
            }
        )
    return rows
