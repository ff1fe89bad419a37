"""lucidlm.hf on torchvision's ViT: pixel relevances, exact CP-LRP conservation, LRP-γ, isolation.

The test command (scripts/test.sh) installs ``torchvision==0.28.0`` (the release built for torch
2.13) with ``--no-deps --target .venv-torchvision`` and runs this module alone with that folder on
``PYTHONPATH``; elsewhere the module skips. PyPI's torchvision wheel links its C++ ops against CUDA
torch, so they do not load beside the CPU build, and ``import torchvision`` then fails on its
fake-kernel registration for ``torchvision::nms`` (so would transformers and peft, which import
torchvision when they find it: hence the separate folder). The models under test (``VisionTransformer``) are pure
Python and never call those ops, so ``import_torchvision`` declares the two op schemas that the
import needs (no kernels: calling them would raise) and imports the real package.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

def import_torchvision():
    """Import torchvision; where its C++ ops cannot load (CUDA wheel beside CPU torch), declare the
    schemas its import registers fake kernels for, so that the pure-Python models import."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision not installed (scripts/test.sh: pip install --no-deps --target "
                    ".venv-torchvision torchvision==0.28.0, then PYTHONPATH=.venv-torchvision)",
                    allow_module_level=True)
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        import sys
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the failed import left half-initialised modules behind
        for op in ("nms", "qnms"):
            OP_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision


OP_SCHEMAS = torch.library.Library("torchvision", "FRAGMENT")  # kept alive: dropping it undefines
torchvision = import_torchvision()

from torchvision.models.vision_transformer import VisionTransformer  # noqa: E402

from lucidlm import hf  # noqa: E402
from lucidlm.errors import ExplainError  # noqa: E402
from lucidlm.explain.explanation import ImageExplanation  # noqa: E402


def tiny_vit(seed: int = 0, dtype=torch.float64, zero_bias: bool = False) -> VisionTransformer:
    """vit_b_16's architecture at toy size: 32×32 images, 8×8 patches, 2 layers."""
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                              mlp_dim=32, num_classes=5)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)  # zero-init heads would explain nothing
            # "every bias" includes the class token and position embeddings: constants added to
            # the hidden state soak up relevance exactly as a bias does
            if zero_bias and (name.endswith("bias") or name in ("class_token", "encoder.pos_embedding")):
                p.zero_()
    return model.eval().to(dtype)


def image(seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_vit_b_16_itself_is_supported():
    model = torchvision.models.vit_b_16(weights=None)
    with hf.explainable(model, "cp-lrp") as handle:
        patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == 12 + 12 * 2 + 12 * 1 + 1  # attention, 2 LayerNorms and GELU per block, final LN
    assert handle.removed and not any("forward" in vars(m) for m in model.modules())


@pytest.mark.parametrize("target", [None, 3])
def test_cp_lrp_conserves_the_logit_over_pixels(target):
    model = tiny_vit(zero_bias=True)
    a = hf.attribute(model, image(), target=target, method="cp-lrp")
    assert a.relevance.shape == (32, 32) and a.relevance.dtype == torch.float64
    assert abs(float(a.relevance.sum() - a.logit)) / abs(float(a.logit)) < 1e-4


def test_explain_returns_an_image_explanation_with_a_png_overlay():
    model = tiny_vit(dtype=torch.float32)
    labels = ["cat", "dog", "car", "tree", "boat"]
    e = hf.explain(model, image(dtype=torch.float32), labels=labels)
    assert isinstance(e, ImageExplanation) and e.method == "cp-lrp"
    assert e.target in labels and e.relevance.shape == (32, 32)
    assert e.image.shape == (3, 32, 32) and 0 <= float(e.image.min()) <= float(e.image.max()) <= 1
    assert e.to_png()[:4] == b"\x89PNG" and e.to_png(overlay=False)[:4] == b"\x89PNG"
    assert ImageExplanation.from_json(e.to_json()) == e
    assert hf.explain(model, image(dtype=torch.float32), target="dog", labels=labels).target == "dog"


def test_gamma_rule_changes_the_heatmap_but_not_the_logits():
    model = tiny_vit()
    x = image().unsqueeze(0)
    plain = model(x)
    with hf.explainable(model, "gamma"):
        assert torch.allclose(model(x), plain, atol=1e-10)  # LRP-γ only changes the backward
    cp = hf.attribute(model, image(), target=1, method="cp-lrp").relevance
    gamma = hf.attribute(model, image(), target=1, method="gamma").relevance
    assert torch.isfinite(gamma).all() and not torch.allclose(cp, gamma)
    # γ = 0 is the plain z-rule, i.e. CP-LRP's gradient × input on linear layers (up to the
    # 1e-6 stabiliser of the rule's denominators)
    zero = hf.attribute(model, image(), target=1, method="gamma", gamma_conv=0.0, gamma_linear=0.0).relevance
    assert float((zero - cp).abs().max() / cp.abs().max()) < 1e-3


def test_patching_one_vit_leaves_another_and_restores_bits():
    a, b = tiny_vit(dtype=torch.float32), tiny_vit(dtype=torch.float32)
    x = image(dtype=torch.float32).unsqueeze(0)

    def run(model):
        pixels = x.clone().requires_grad_(True)
        out = model(pixels)
        (grad,) = torch.autograd.grad(out[0, 2], pixels)
        return out.detach(), grad

    before_a, before_b = run(a), run(b)
    with hf.explainable(a, "cp-lrp"):
        assert torch.allclose(run(a)[0], before_a[0], atol=1e-5)
        for got, want in zip(run(b), before_b):
            assert torch.equal(got, want)
    for got, want in zip(run(a), before_a):
        assert torch.equal(got, want)


def test_attnlrp_also_runs_and_text_methods_are_checked():
    model = tiny_vit()
    assert torch.isfinite(hf.attribute(model, image(), method="attnlrp").relevance).all()
    with pytest.raises(ExplainError, match="method"):
        hf.explainable(model, "lrp-epsilon")
    with pytest.raises(ExplainError, match="image"):
        hf.attribute(model, torch.zeros(2, 3, 32, 32, dtype=torch.float64))
