"""CoCa captioning: the caption loss against a hand-computed cross-entropy, SyCoCa's attentive masking and
TG-MIM against brute force, decoding against open_clip's own `generate` on the export, and 2-process FSDP
training against one process."""

import math
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import REPO, run_in_process
from xmodal.data import load_image, resize_center_crop
from xmodal.models import load_encoder
from xmodal.models.build import ModelSpec, build_model, build_tokenizer, resolve_model_config
from xmodal.models.captioner import (
    EOT,
    SOT,
    Decoding,
    caption_forward,
    caption_images,
    caption_logits,
    coca_encode,
    generate,
    ids_to_text,
    linear_cross_entropy_sum,
    token_relevance,
)
from xmodal.objectives.captioning import Caption, TgMim
from xmodal.objectives.registry import Features


@pytest.fixture(scope="module")
def coca():
    """A seeded xm-coca-tiny, perturbed so that its decoder's distributions are far from uniform."""
    cfg = resolve_model_config(ModelSpec(name="xm-coca-tiny"))
    cfg["tgmim"] = {"depth": 1}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_model(ModelSpec(name="xm-coca-tiny"), cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model, build_tokenizer(cfg)


def _features(img, txt, out) -> Features:
    return Features(img, txt, img, txt, 0, torch.tensor(10.0), caption=out)


def test_caption_loss_is_the_cross_entropy_over_real_labels(coca):
    model, tok = coca
    ids = tok(["a red circle", "a small blue square left of a large green star", "x"])
    ids[2, 2] = 0  # open_clip's pad id is also BPE's "!": a 0 inside a caption is skipped as well
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        img, txt, out = caption_forward(model, pixels, ids)
        full = model(pixels, ids)["logits"].double()  # open_clip's forward: every position
    total, n = 0.0, 0
    for b in range(3):
        for t in range(ids.shape[1] - 1):
            y = int(ids[b, t + 1])
            if y != 0:
                total -= full[b, t].log_softmax(-1)[y].item()
                n += 1
    assert n == int((ids[:, 1:] != 0).sum()) and out.n_labels == n
    ours = Caption().terms(_features(img, txt, out))["caption"].item()
    assert ours == pytest.approx(total / n, rel=1e-5)
    ref = open_clip.loss.CoCaLoss(caption_loss_weight=1.0, clip_loss_weight=0.0)
    oc = model(pixels, ids)
    assert ours == pytest.approx(ref(oc["image_features"], oc["text_features"], oc["logits"],
                                     oc["labels"], oc["logit_scale"])[1].item(), rel=1e-5)  # fmt: skip


def test_attentive_masking_and_tgmim_equal_brute_force(coca):
    model, tok = coca
    ids = tok(["a red circle above a blue square", "green star"])
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        _, _, image_embs, token_embs = coca_encode(model, pixels, ids)
        rel = token_relevance(model, image_embs, token_embs, ids)
        n = image_embs.shape[1]
        for b in range(2):  # relevance: max cosine over the caption's words, in the contrastive space
            words = [t for t in range(ids.shape[1]) if int(ids[b, t]) not in (0, SOT, EOT)]
            for j in range(n):
                v = image_embs[b, j] @ model.visual.proj
                w = [model.text.ln_final(token_embs[b, t]) @ model.text.text_projection for t in words]
                sims = [F.cosine_similarity(v, x, dim=0).item() for x in w]
                assert rel[b, j].item() == pytest.approx(max(sims), abs=1e-5)
        # r_l = 0.5: the decoder sees the top half of the tokens by relevance
        _, _, out = caption_forward(model, pixels, ids, drop_low=0.5, mim_ratio=0.25)
        keep = [sorted(range(n), key=lambda j: -rel[b, j].item())[: n - round(0.5 * n)] for b in range(2)]
        kept = torch.stack([image_embs[b, keep[b]] for b in range(2)])
        logits, labels = caption_logits(model, kept, token_embs, ids)
        ref = F.cross_entropy(logits, labels, reduction="sum")
        assert out.loss_sum.item() == pytest.approx(ref.item(), rel=1e-5)
        # r_h = 0.25: the most relevant quarter is masked; the targets are those tokens
        m = round(0.25 * n)
        top = [set(sorted(range(n), key=lambda j: -rel[b, j].item())[:m]) for b in range(2)]
        want = torch.stack([image_embs[b, j] for b in range(2) for j in sorted(top[b])])
        assert torch.allclose(out.mim_target, want)
    loss = TgMim().terms(_features(None, None, out))["tgmim"].item()
    ln = [(t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-5) for t in out.mim_target.double()]
    ref = sum(((p.double() - q) ** 2).sum().item() for p, q in zip(out.mim_pred, ln, strict=True))
    assert loss == pytest.approx(ref / out.mim_pred.numel(), rel=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_linear_cross_entropy_equals_the_unfused_loss_and_gradients(autocast):
    """The chunked loss (logits never stored) against `F.cross_entropy(h @ w)`, in float32 and under bf16
    autocast (where both run the matmuls in bf16)."""
    g = torch.Generator().manual_seed(4)
    h0, w0 = torch.randn(37, 16, generator=g), torch.randn(16, 301, generator=g)
    y = torch.randint(0, 301, (37,), generator=g)
    grads, values = [], []
    for fused in (True, False):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = linear_cross_entropy_sum(h, w, y, chunk=8)  # chunks that do not divide 37
            else:
                loss = F.cross_entropy((h @ w).float(), y, reduction="sum")
        (2.5 * loss).backward()
        values.append(loss.item())
        grads.append((h.grad, w.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    assert values[0] == pytest.approx(values[1], rel=tol["rtol"])
    for a, b in zip(*grads, strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.allclose(a, b, **tol)


def _logprob(model, pixels, ids) -> float:
    """Teacher-forced log-probability of a generated caption (start token excluded, end token included)."""
    ids = ids[: (ids == EOT).nonzero()[0].item() + 1][None]
    _, _, ie, te = coca_encode(model, pixels[None], ids)
    logits, labels = caption_logits(model, ie, te, ids)
    return logits.log_softmax(-1).gather(1, labels[:, None]).sum().item()


def test_decoding_rules(coca):
    model, _ = coca
    pixels = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    greedy = generate(model, pixels, Decoding(max_len=12, min_len=6))
    beam = generate(model, pixels, Decoding(max_len=12, min_len=6, beam=4))
    for ids in (greedy, beam):
        assert (ids[:, 0] == SOT).all() and ids.shape[1] <= 12
        for row in ids.tolist():
            end = row.index(EOT)  # every caption ends, no earlier than min_len tokens
            assert end + 1 >= 6 and all(t == 0 for t in row[end + 1 :])
    # beam search keeps the hypotheses greedy decoding drops: never a lower length-normalised score here
    for i in range(4):
        n_g, n_b = int((greedy[i] == EOT).nonzero()[0]), int((beam[i] == EOT).nonzero()[0])
        with torch.no_grad():
            lp_beam, lp_greedy = _logprob(model, pixels[i], beam[i]), _logprob(model, pixels[i], greedy[i])
        assert lp_beam / n_b >= lp_greedy / n_g - 1e-5
    # a nucleus of (almost) no mass is the top token alone: greedy; sampling is seeded
    assert torch.equal(generate(model, pixels, Decoding(max_len=12, min_len=6, top_p=1e-9)), greedy)
    s1 = generate(model, pixels, Decoding(max_len=12, top_p=0.9, seed=1))
    assert torch.equal(s1, generate(model, pixels, Decoding(max_len=12, top_p=0.9, seed=1)))


def _enable_open_clip_generate():
    """open_clip 3.3 turns CoCa.generate off entirely when transformers lacks BeamSearchScorer (gone since
    transformers 4.56); its top-k loop needs only the logits processors, which still exist."""
    import open_clip.coca_model as cm
    import transformers as tf

    for name in ("LogitsProcessorList", "MaxLengthCriteria", "MinLengthLogitsProcessor",
                 "RepetitionPenaltyLogitsProcessor", "StoppingCriteriaList"):  # fmt: skip
        setattr(cm, name, getattr(tf, name))
    cm.GENERATION_TYPES.update(top_k=tf.TopKLogitsWarper, top_p=tf.TopPLogitsWarper)
    cm._has_transformers = True


def test_greedy_captions_equal_open_clip_generate_on_the_export(coca_run, tiny_manifest, tmp_path):
    out = tmp_path / "export"
    run_in_process("export", coca_run, "--format", "open_clip", out)
    _enable_open_clip_generate()
    open_clip.add_model_config(out / "model.json")
    weights = str(out / "open_clip_model.pt")
    oc, _, preprocess = open_clip.create_model_and_transforms("model", pretrained=weights)
    oc.eval()
    paths = sorted(tiny_manifest.parent.glob("*.png"))[:5]
    with torch.no_grad():
        ref = oc.generate(torch.stack([preprocess(Image.open(p)) for p in paths]), generation_type="top_k",
                          top_k=1, seq_len=20)  # fmt: skip
    for source in (coca_run, out):  # the run and its export caption alike
        enc = load_encoder(source)
        images = torch.stack([resize_center_crop(load_image(str(p)), enc.image_size) for p in paths])
        x = enc.normalize_pixels(images.float() / 255)
        ours = generate(enc.model, x, Decoding(max_len=20))
        assert torch.equal(ours, ref[:, : ours.shape[1]]) and (ref[:, ours.shape[1] :] == 0).all()
        assert caption_images(enc, images, Decoding(max_len=20)) == ids_to_text(enc.tokenizer, ref)


def test_two_process_fsdp_equals_one_process_with_sycoca(tiny_manifest, tmp_path):
    """clip+caption+tgmim on xm-coca-tiny: FSDP over 2 gloo processes (4 rows each) vs one process. The
    caption term is normalised by the global label count, so ranks with unequal caption lengths agree."""
    from tests.test_train import losses, max_weight_diff, terms

    common = ["train", "--data", str(tiny_manifest), "--model", "xm-coca-tiny", "--precision", "fp32",
              "--no-progress", "--lr", "1e-3", "--warmup", "1", "--batch-size", "8", "--steps", "3",
              "--log-every", "1",
              "--objective", "clip+caption:2(attentive=0.5)+tgmim:1(ratio=0.5)"]  # fmt: skip
    single, double = tmp_path / "single", tmp_path / "double"
    run_in_process(*common, "--out", single)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         "-m", "xmodal", *common, "--fsdp", "--out", str(double)],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = losses(single), losses(double)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
        for name in ("clip", "caption", "tgmim"):
            assert math.isclose(terms(single)[step][name], terms(double)[step][name], abs_tol=1e-5)
    assert max_weight_diff(single, double) < 1e-5


def test_the_decoder_is_initialised():
    """open_clip's MultimodalTransformer never runs its init_parameters: its vocabulary projection is
    torch.empty (uninitialised memory; NaN losses in some runs). build_model initialises it."""
    a, b = (build_model(ModelSpec(name="xm-coca-tiny")).text_decoder for _ in range(2))
    for d in (a, b):
        assert d.text_projection.isfinite().all()
        assert d.text_projection.std().item() == pytest.approx(d.width**-0.5, rel=0.05)
    assert not torch.equal(a.text_projection, b.text_projection)  # drawn from the RNG, not a constant
