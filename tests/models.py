"""The model matrix: tiny configs of the architectures the core issue names.

Data, not code: adding a row covers a new model with every test that uses it.
"""
TIMM_MODELS = {
    "vit_tiny_patch16_224": dict(depth=2, img_size=64),
    "deit_tiny_distilled_patch16_224": dict(depth=2, img_size=64),
    "vit_small_patch14_reg4_dinov2": dict(depth=2, embed_dim=64, num_heads=2, img_size=56),
    "vit_base_patch16_clip_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=64),
    "swin_tiny_patch4_window7_224": dict(depths=(2, 2), num_heads=(2, 4), embed_dim=32, img_size=112),
    "swinv2_tiny_window8_256": dict(depths=(2, 2), num_heads=(2, 4), embed_dim=32, img_size=64),
    "maxvit_tiny_tf_224": dict(depths=(1, 1), embed_dim=(32, 64), img_size=64),
    "eva02_tiny_patch14_224": dict(depth=2, img_size=56),
    "beit_base_patch16_224": dict(depth=2, embed_dim=64, num_heads=2, img_size=64),
    "convnext_atto": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
}


def input_size(model, kwargs) -> tuple:
    if "img_size" in kwargs:
        return (3, kwargs["img_size"], kwargs["img_size"])
    return tuple(model.pretrained_cfg["input_size"])


def tiny_open_clip_vision():
    """open_clip ViT-B-32's image tower architecture, shrunk (same VisionTransformer class)."""
    import open_clip

    vision_cfg = dict(image_size=64, layers=2, width=64, head_width=32, patch_size=16)
    return open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg,
                          text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)).visual


def matrix_model(name: str):
    """(model in float64, eval mode, without a classifier; its input size [C, H, W]) of a matrix row or
    ``"open_clip"``."""
    import timm

    if name == "open_clip":
        return tiny_open_clip_vision().double().eval(), (3, 64, 64)
    kwargs = TIMM_MODELS[name]
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).double().eval()
    return model, input_size(model, kwargs)


def matrix_decomposer(name: str, seed: int = 0):
    """(a decomposer of ``matrix_model(name)`` built after ``torch.manual_seed(seed)``, its input size)."""
    import torch

    from decompose import trace_and_decompose

    torch.manual_seed(seed)
    model, size = matrix_model(name)
    return trace_and_decompose(model), size


def gated_model():
    """A patch embedding plus a residual gate that branches on the batch's values (``x.sum() > 0``):
    untraceable, so the tracer makes it opaque, and no graph can record it."""
    import torch
    from torch import nn

    class ValueGate(nn.Module):
        def forward(self, x):
            return torch.relu(x) if x.sum() > 0 else 2 * x  # decided by the batch's values

    class GatedBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, 4)
            self.gate = ValueGate()

        def forward(self, images):
            x = self.embed(images).flatten(2).transpose(1, 2)
            return (x + self.gate(x)).mean(1)

    return GatedBranch().eval()
