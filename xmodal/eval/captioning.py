"""Captioning task (`--task captioning`, CoCa models): generate a caption per test image with the run's
decoder and score it against all of the image's reference captions with the COCO caption evaluation
(pycocoevalcap: PTB tokenisation, BLEU-1…4, METEOR, ROUGE-L, CIDEr), optionally beside the
"retrieve instead of generate" baseline (each image's nearest training caption by ITC similarity).

Java: pycocoevalcap's PTBTokenizer and METEOR are Java programs. Without `java` on PATH, METEOR is
reported as null with a note, and tokenisation falls back to `ptb_tokenize_line`, a pure-Python
re-implementation of what PTBTokenizer (Stanford CoreNLP 3.4.1, `-preserveLines -lowerCase`) followed
by pycocoevalcap's punctuation removal gives on ordinary captions. BLEU, ROUGE-L and CIDEr are pure
Python in pycocoevalcap and are always computed.
"""

from __future__ import annotations

import contextlib
import functools
import re
import shutil
import subprocess
from collections.abc import Hashable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any
from unittest import mock

import torch

from xmodal.errors import UserError

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
GALLERY = 24  # images shown in the report's captioning gallery
TOKENIZER_JAVA = "ptb (pycocoevalcap, java)"
TOKENIZER_PYTHON = "ptb-compatible (pure python)"
NO_JAVA = "java not found on PATH"


def java_available() -> bool:
    return shutil.which("java") is not None


# -- PTB tokenisation without Java ------------------------------------------------------------------------
#
# A longest-match lexer (as the flex-generated PTBLexer is: the longest match wins, ties go to the earlier
# rule) over the rules that occur in captions, with PTB's normalisations (brackets → -LRB- …, dashes → --,
# "n't"/"'s"/… split off, "gonna" → "gon na", "cannot" → "can not"), then lower case, then pycocoevalcap's
# PUNCTUATIONS removed. Quirks kept on purpose so that scores match the Java pipeline exactly:
# -lrb-/-rrb-/-lsb-/… stay in (pycocoevalcap's list has them upper case, the tokenizer lower-cases), as do
# "?!" runs and symbols such as & % $ #.

_W = r"[^\W_]"  # a letter or digit (any script)
_L = r"[^\W\d_]"  # a letter
_ABBREV = (
    "mr|mrs|ms|dr|st|jr|sr|mt|ave|co|inc|ltd|corp|gen|prof|vs|etc|ft|jan|feb|mar|apr|jun|jul|aug|sep|sept|"
    "oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri|dept|est|rd|blvd|gov|sen|rep|capt|col|lt|sgt|bros|cf|al"
)
_CLITIC = "[sSmMdDtT]|re|RE|ve|VE|ll|LL"
_RULES: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(rx))
    for name, rx in [
        ("url", r"https?://[^\s\"'()\[\]{}<>]*[^\s\"'()\[\]{}<>.,;:!?]"),
        ("www", rf"(?i:www)\.{_W}+(?:[.-]{_W}+)*"),
        ("email", r"[\w.+-]+@\w[\w-]*(?:\.\w[\w-]*)+"),
        ("acronym", rf"(?:{_L}\.){{2,}}"),  # u.s. p.m. i.e. a.k.a.
        ("initial", rf"{_L}\.(?!{_W})"),  # J. (and "a." too)
        ("abbrev", rf"(?i:{_ABBREV})\.(?!{_W})"),
        ("abbrev_num", r"(?i:no|fig|pp|op)\.(?=\s+\d)"),  # "No. 5" but "say no."
        (
            "assim",
            r"(?i:(?P<t>gon(?=na)|wan(?=na)|got(?=ta)|lem(?=me)|gim(?=me)|can(?=not))"
            rf"(?:na|ta|me|not))(?!{_W})",
        ),
        ("n_t_word", rf"(?P<t>{_W}*[^\W\d_nN])[nN]'[tT](?!{_W})"),  # do|n't, ca|n't, wo|n't
        ("n_t", rf"[nN]'[tT](?!{_W})"),
        ("redaux", rf"'(?:[msdMSD]|re|RE|ve|VE|ll|LL)(?!{_W})"),  # 's 'm 'd 're 've 'll
        (
            "apoword",
            rf"'n'|'[eE][mM](?!{_W})|'[2-9]0[sS](?!{_W})|'[tT][iI][lL][lL]?(?!{_W})"
            rf"|'[cC]ause(?!{_W})",
        ),
        ("tis", rf"(?P<t>'[tT])[iI][sS](?!{_W})"),  # 'tis → 't is
        ("y_apos", rf"(?P<t>[yY]'){_L}+"),  # y'all → y' all
        ("number", r"\d+(?:[.,:]\d+)+"),  # 3.5 1,000 12:30 (a bare digit run is a word)
        ("slash", rf"{_W}+\\?/{_W}+(?:-{_W}+)?"),  # and/or 50/50 1/2
        ("hyphenated", rf"{_W}[\w%.,]*(?:-(?:{_W}+|(?:{_L}\.)+))+"),  # 10-year-old x-ray 1,000-year-old
        ("amp", r"[A-Z]+(?:&[A-Z]+)+"),  # B&W AT&T
        ("hashtag", rf"[#@]{_L}\w*"),
        ("dotted", rf"{_L}{_W}*(?:\.{_W}+)+"),  # example.com, "cat.A" (no space after a full stop)
        # a word; an apostrophe between letters stays in it (o'clock, ma'am) unless a clitic follows
        ("word", rf"{_W}+(?:(?<={_L})'(?!(?:{_CLITIC})(?!{_W})|n')(?={_L}){_W}+)*"),
        ("smiley", r"[<>]?[:;=][-o*']?[()DPdpO\\{@|\[\]](?!\w)"),  # :) → :-rrb-
        ("dots", r"\.(?:\s*\.){2,}|\.(?=\.)"),  # ... and ". . ." → "..."; ".." → ". ."
        ("qe", r"[?!]+"),
        ("dashes", r"-{2,}"),
        ("quote", r"\"|``|''|`"),
        ("other", r"\S"),
    ]
]
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}
_UNICODE = str.maketrans(
    {"“": '"', "”": '"', "„": '"', "‘": "'", "’": "'", "—": " -- ", "–": " -- ", "…": "...",
     "£": "#", "€": "$", "½": "1/2", "\u00a0": " "}
)  # fmt: skip


def _punctuations() -> frozenset[str]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS

    return frozenset(PUNCTUATIONS)


def ptb_tokens(text: str) -> list[str]:
    """PTBTokenizer's tokens of one line (lower-cased, punctuation still in)."""
    s = text.replace("\n", " ").translate(_UNICODE)
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        if s[i].isspace():
            i += 1
            continue
        best_name, best_end, best_len = "other", i + 1, 0
        for name, rx in _RULES:  # the longest match wins (trailing context counts), ties: the earlier rule
            m = rx.match(s, i)
            if m is not None and m.end() - i > best_len:
                t = m.groupdict().get("t")
                best_name, best_len = name, m.end() - i
                best_end = m.end() if t is None else m.end("t")
        tok = s[i:best_end]
        if best_name == "dots":
            tok = "..." if len(tok.replace(" ", "")) >= 3 else "."
            best_end = i + 1 if tok == "." else best_end
        elif best_name == "dashes":
            tok = "--"
        elif best_name == "quote":
            tok = "''"
        elif best_name == "smiley":
            tok = "".join(_BRACKETS.get(c, c) for c in tok)
        out.append(_BRACKETS.get(tok, tok).lower())
        i = best_end
    return out


def ptb_tokenize_line(text: str) -> str:
    """What pycocoevalcap's PTBTokenizer makes of one caption: PTB tokens, lower case, PUNCTUATIONS
    removed, joined by single spaces — without Java."""
    punct = _punctuations()
    return " ".join(t for t in ptb_tokens(text) if t not in punct)


def tokenize(captions: Mapping[Hashable, Sequence[str]]) -> tuple[dict[Hashable, list[str]], str, list[str]]:
    """{id: [caption, …]} → ({id: [tokenised caption, …]}, tokenizer used, notes): pycocoevalcap's
    PTBTokenizer when Java is there, else (or if it fails) the pure-Python equivalent."""
    notes: list[str] = []
    if java_available():
        from pycocoevalcap.tokenizer import ptbtokenizer

        ids = list(captions)
        # its Java process reports "PTBTokenizer tokenized N tokens …" on stderr: keep that off the user's
        quiet = SimpleNamespace(
            Popen=functools.partial(subprocess.Popen, stderr=subprocess.DEVNULL), PIPE=subprocess.PIPE
        )
        try:
            with mock.patch.object(ptbtokenizer, "subprocess", quiet):
                tok = ptbtokenizer.PTBTokenizer().tokenize(
                    {k: [{"caption": c} for c in captions[k]] for k in ids}
                )
        except (OSError, ValueError) as e:  # e.g. a read-only site-packages (it writes a temp file there)
            notes.append(f"PTBTokenizer failed ({e}); used the pure-Python PTB-compatible tokenizer")
        else:
            # an empty last caption yields no output line: pad so every caption keeps its place
            return (
                {k: (tok.get(k, []) + [""] * len(captions[k]))[: len(captions[k])] for k in ids},
                TOKENIZER_JAVA,
                notes,
            )
    else:
        notes.append(f"{NO_JAVA}: tokenised with the pure-Python PTB-compatible tokenizer")
    return {k: [ptb_tokenize_line(c) for c in v] for k, v in captions.items()}, TOKENIZER_PYTHON, notes


# -- metrics ---------------------------------------------------------------------------------------------

_METEOR: Any = None  # one METEOR process per Python process: it takes ~10 s to load its paraphrase table


def meteor_scorer() -> Any:
    """pycocoevalcap's Meteor(), started once and reused (needs Java)."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def _drop_meteor() -> None:
    """Forget a broken METEOR process (its lock may still be held: Meteor.__del__ would wait on it)."""
    global _METEOR
    m, _METEOR = _METEOR, None
    if m is not None:
        if m.lock.locked():
            m.lock.release()
        with contextlib.suppress(Exception):
            m.meteor_p.kill()


def caption_metrics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[str, Any]:
    """COCO caption metrics of one caption per id against all of that id's references.

    As pycocoevalcap's COCOEvalCap: references and predictions are tokenised by PTBTokenizer (lower case,
    punctuation removed); then Bleu(4) (corpus BLEU-1…4, "closest" reference length), Meteor() (METEOR 1.5,
    English, normalised), Rouge() (mean ROUGE-L F, β = 1.2) and Cider() (n = 1…4, σ = 6, document
    frequencies from these references). Values as pycocoevalcap returns them: BLEU, METEOR, ROUGE-L in
    [0, 1]; CIDEr ≥ 0, typically 0–3 (papers print every metric ×100). Blank references are dropped.

    Without `java` on PATH METEOR is None, with a note, and tokenisation uses `ptb_tokenize_line`, the
    pure-Python equivalent of PTBTokenizer on ordinary captions (see the module docstring), so BLEU,
    ROUGE-L and CIDEr are the same numbers as with Java.
    """
    ids = list(predictions)
    if not ids:
        raise UserError("captioning: no images to score (no predictions)")
    missing = [k for k in ids if not [r for r in references.get(k, ()) if str(r).strip()]]
    if missing:
        raise UserError(f"captioning: image {missing[0]!r} has no reference caption to score against")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, tokenizer, notes = tokenize({k: [str(r) for r in references[k] if str(r).strip()] for k in ids})
    res, _, more = tokenize({k: [str(predictions[k])] for k in ids})
    notes += [m for m in more if m not in notes]
    out: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)})
    out["METEOR"] = None
    if java_available():
        try:
            out["METEOR"] = float(meteor_scorer().compute_score(gts, res)[0])
        except (OSError, ValueError) as e:  # the Java process failed to start or died (e.g. no memory)
            _drop_meteor()
            notes.append(f"METEOR failed ({type(e).__name__}: {e}); reported as null")
    else:
        notes.append(f"{NO_JAVA}: METEOR (a Java program) not computed")
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["n_images"] = len(ids)
    out["n_references"] = sum(len(gts[k]) for k in ids)
    out["tokenizer"] = tokenizer
    out["notes"] = notes
    return out


# -- the retrieval baseline -------------------------------------------------------------------------------


@torch.no_grad()
def nearest_caption_baseline(
    encoder: Any, train_captions: Sequence[str], images_uint8: torch.Tensor, batch_size: int = 256
) -> list[str]:
    """For each image, the training caption with the highest ITC (cosine) similarity — the "retrieve
    instead of generate" baseline. Each distinct caption is embedded once; ties go to the first."""
    distinct = list(dict.fromkeys(str(c) for c in train_captions if str(c).strip()))
    if not distinct:
        raise UserError("--caption-baseline: the manifest has no captions")
    txt = encoder.encode_texts(distinct, batch_size=batch_size).float()
    img = encoder.encode_images(images_uint8, batch_size=batch_size).float()
    best = torch.cat([(img[i : i + 1024] @ txt.T).argmax(1) for i in range(0, len(img), 1024)])
    return [distinct[j] for j in best.tolist()]


# -- the eval task ----------------------------------------------------------------------------------------


def has_decoder(encoder: Any) -> bool:
    model = getattr(encoder, "model", None)
    if model is None:
        return False
    from xmodal.models.captioner import is_coca

    return is_coca(model)


def check_requests(names: Sequence[str], caption_baseline: str | None) -> None:
    if caption_baseline is not None and "captioning" not in names:
        raise UserError("--caption-baseline needs the captioning task (--task captioning)")


def require_decoder(encoder: Any) -> None:
    """A one-line error unless the encoder's model is a CoCa (has a caption decoder)."""
    model = getattr(encoder, "model", None)
    if model is None:
        raise UserError("--task captioning: the model has no caption decoder; train a CoCa model, "
                        "e.g. xmodal train --model xm-coca-tiny --objective clip+caption:2")  # fmt: skip
    from xmodal.models.captioner import check_coca

    check_coca(model, "--task captioning")


def unavailable(ctx: Any) -> str | None:
    if not any(ctx.data.captions[i] for i in range(ctx.cache.n_images)):
        return "no reference captions in the data"
    return None


def _decoding(ctx: Any):
    from xmodal.models.captioner import Decoding

    o = ctx.options
    return Decoding(max_len=int(o.caption_max_len), beam=int(o.caption_beam))


def run(ctx: Any) -> dict[str, Any]:
    from xmodal.models.captioner import caption_images

    enc, data, o = ctx.encoder, ctx.data, ctx.options
    require_decoder(enc)
    d = _decoding(ctx)
    d.check(enc.model.text.context_length)
    ids = [i for i in range(ctx.cache.n_images) if data.captions[i]]
    refs = {i: list(data.captions[i]) for i in ids}
    preds: list[str] = []
    step = 256
    for s in range(0, len(ids), step):
        chunk = torch.tensor(ids[s : s + step], dtype=torch.long)
        preds += caption_images(enc, data.images[chunk], d, batch_size=min(64, ctx.cache.batch_size))
        ctx.log(f"captioning: {min(s + step, len(ids))}/{len(ids)} images")
    res = caption_metrics(dict(zip(ids, preds, strict=True)), refs)
    notes = res.pop("notes")
    res["decoding"] = {
        "method": "greedy" if d.beam == 1 else "beam",
        "beam": d.beam,
        "max_len": d.max_len,
        "min_len": d.min_len,
        "length_penalty": d.length_penalty,
    }
    art: dict[str, Any] = {"ids": ids, "predictions": preds, "references": [refs[i] for i in ids]}
    if o.caption_baseline is not None:
        base = baseline(ctx, ids)
        art["baseline"] = base
        b = caption_metrics(dict(zip(ids, base, strict=True)), refs)
        notes += [m for m in b.pop("notes") if m not in notes]
        b.pop("tokenizer", None)
        res["baseline_nearest_train_caption"] = b
    res["notes"] = notes
    ctx.artifacts["captioning"] = art
    return res


def baseline(ctx: Any, ids: list[int]) -> list[str]:
    from xmodal.data import DataStats, read_records

    path = ctx.options.caption_baseline
    stats = DataStats()
    records = read_records(path, stats=stats)
    captions = [c for r in records for c in r.captions]
    ctx.log(f"caption baseline: {len(captions)} captions from {path}")
    if not captions:
        raise UserError(f"--caption-baseline {path}: the manifest has no captions")
    idx = torch.tensor(ids, dtype=torch.long)
    return nearest_caption_baseline(ctx.encoder, captions, ctx.data.images[idx], ctx.cache.batch_size)
