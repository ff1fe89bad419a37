"""torchvision's ``VisionTransformer`` (``vit_b_16``, ``vit_b_32``, ``vit_l_16`` ... and any
``VisionTransformer(...)`` you build). torchvision is not imported here: the patches are plain
torch, so lucidlm works without torchvision installed."""

from __future__ import annotations

from .. import patches, vision
from ..registry import register

register(
    "torchvision.models.vision_transformer.VisionTransformer",
    {
        "torch.nn.modules.activation.MultiheadAttention": vision.multihead_attention,
        # LRP-γ, only when method="gamma" (the factories return None otherwise)
        "torch.nn.modules.linear.Linear": patches.gamma_linear,
        "torch.nn.modules.conv.Conv2d": patches.gamma_conv,
    },
    name="ViT (torchvision vit_b_16 family)",
    kind="image",
)
