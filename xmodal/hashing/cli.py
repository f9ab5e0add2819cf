"""`xmodal hash train RUN --bits 64 --data M --out HASHRUN`: hash heads on a trained model, through the
ordinary trainer (resume, metrics, TensorBoard as in `xmodal train`). The towers stay frozen unless
`--unfreeze`; the run's model is RUN's plus the heads, and starts from RUN's weights (`--init-from`)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import typer

from xmodal.errors import UserError
from xmodal.fsutil import write_text_atomic
from xmodal.train.cli import option, run_training, with_train_options

hash_app = typer.Typer(help="Learned binary codes: hash heads on a trained model.", no_args_is_help=True)
DEFAULT_OBJECTIVE = {"linear": "dcmh", "recurrent": "bebr"}
SHARED = {"auto": None, "yes": True, "no": False}
_REPLACED = ("model", "pretrained", "init_from", "hf_text", "hf_pooler", "lock_image", "lock_text")


def hash_train(**kw) -> None:
    from xmodal.hashing.heads import HashHeads
    from xmodal.train.config import load_run_config

    run, bits, head, code_steps, hidden, shared, unfreeze = (
        kw.pop(k) for k in ("run", "bits", "head", "code_steps", "hidden", "shared", "unfreeze")
    )
    config, resume, resume_override = kw.pop("config"), kw.pop("resume"), kw.pop("resume_override")
    out = kw.get("out")
    if not out:
        raise UserError("--out is required: the hash run's folder")
    base = dict(load_run_config(Path(run))["model_config"])
    for aid in ("tgmim", "feature_proj", "hash_heads"):  # the base run's own training aids
        base.pop(aid, None)
    if shared not in SHARED:
        raise UserError(f"--shared {shared}: use auto, yes or no")
    shared = SHARED[shared]
    heads = HashHeads(int(base["embed_dim"]), bits, kind=head, steps=code_steps, hidden=hidden, shared=shared)
    model_json = Path(out) / "hash_model.json"
    model_json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(model_json, json.dumps({**base, "hash_heads": heads.config()}, indent=2))
    kw.update(model=str(model_json), init_from=str(run), lock_image=not unfreeze, lock_text=not unfreeze)
    if kw.get("objective") is None and not resume:
        kw["objective"] = DEFAULT_OBJECTIVE[head]
    run_training(config, resume, resume_override, kw)


_OWN = [
    inspect.Parameter(
        "run",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Argument(..., help="The trained xmodal run whose embeddings the codes hash."),
        annotation=str,
    ),
    option("bits", 64, int, "Bits per code step (a multiple of 8)."),
    option("head", "linear", str, "linear: DCMH's tanh layer | recurrent: BEBR's recurrent binarization."),
    option("code_steps", 1, int, "Recurrent heads: binarization steps (codes of 1×, 2×, … the bits)."),
    option("hidden", 0, int, "Recurrent heads: MLP width (0 = the embedding width)."),
    option(
        "shared",
        "auto",
        str,
        "One network codes both modalities: auto (recurrent: yes; linear: no, DCMH's per-modality heads) "
        "| yes | no.",
    ),
    option("unfreeze", False, bool, "Fine-tune the towers with the heads (default: towers frozen)."),
]
with_train_options(hash_train, _OWN, _REPLACED)
hash_train.__doc__ = (
    "Train hash heads on RUN's frozen embeddings (dcmh for linear heads, bebr for recurrent ones, by "
    "default); train options apply."
)
hash_app.command("train")(hash_train)


def register(app: typer.Typer) -> None:
    app.add_typer(hash_app, name="hash")
