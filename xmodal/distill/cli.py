"""`xmodal distill`: train a small student from a frozen teacher. It is `xmodal train` with a teacher,
a student (a model config, or `inherit:` weights taken from the teacher) and `clip+affinity` as the
default objective; the result is an ordinary run."""

from __future__ import annotations

from pathlib import Path

import typer

from xmodal.errors import UserError
from xmodal.train.cli import option, run_training, with_train_options

DEFAULT_OBJECTIVE = "clip+affinity"
_REPLACED = ("model", "pretrained")  # the student gives these


def distill(**kw) -> None:
    teacher, student = kw.pop("teacher"), kw.pop("student")
    config, resume, resume_override = kw.pop("config"), kw.pop("resume"), kw.pop("resume_override")
    out = kw.get("out")
    if student.startswith("inherit:"):
        from xmodal.distill.inherit import parse_inherit, write_student

        spec = parse_inherit(student)
        teacher = teacher or spec.teacher
        if not out:
            raise UserError("--out is required: the run folder (the inherited student is written there)")
        folder = Path(out) / "inherited"
        if resume and (folder / "model.json").is_file():  # built when the run started
            model_json, weights = folder / "model.json", folder / "weights.pt"
        else:
            model_json, weights = write_student(spec, folder)
        kw["model"], kw["pretrained"] = str(model_json), str(weights)
    else:
        kw["model"] = student
    if not teacher and not resume:
        raise UserError("--teacher is required (an xmodal run, an open_clip export, or a config)")
    kw["teacher"] = teacher
    if kw.get("objective") is None and not resume:
        kw["objective"] = DEFAULT_OBJECTIVE
    run_training(config, resume, resume_override, kw)


with_train_options(
    distill,
    [
        option(
            "teacher",
            None,
            str | None,
            "The teacher: an xmodal run, an open_clip export folder, or an open_clip config with "
            "--teacher-pretrained (default with inherit:…: the run the student inherits from).",
        ),
        option("teacher_pretrained", None, str | None, "Local weights for a teacher given as a config."),
        option(
            "student",
            ...,
            str,
            "The student: a model config (xm-micro, a .json), or inherit:RUN:layers=N,width=F "
            "(layers and heads kept from RUN's weights; docs/distill.md).",
        ),
        option(
            "teacher_cache",
            None,
            str | None,
            "auto: embed the training set with the teacher once and reuse it (live where augmentation "
            "changes the inputs) | on | off.",
        ),
    ],
    _REPLACED,
)
distill.__doc__ = (
    "Distil a teacher into a smaller student (TinyCLIP affinity mimicking, feature distillation, weight "
    f"inheritance); train options apply. Default objective: {DEFAULT_OBJECTIVE}."
)


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
