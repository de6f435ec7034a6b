"""Architectures no issue names: the same generic rules must hold (one row per family).

Each row builds a tiny model; the test is one function. A failure here points at a missing
general rule in tracer/, never at a reason to special-case the family.
"""
import pytest
import timm
import torch
from timm.models import gcvit, mlp_mixer, mvitv2, volo

FAMILIES = {
    "cait_xxs24_224": lambda: timm.create_model("cait_xxs24_224", depth=2, img_size=64),
    "xcit_nano_12_p16_224": lambda: timm.create_model("xcit_nano_12_p16_224", depth=2, img_size=64),
    "tnt_s_patch16_224": lambda: timm.create_model("tnt_s_patch16_224", depth=2, img_size=64),
    "volo": lambda: volo.VOLO(layers=(1, 1, 1, 1), embed_dims=(64, 128, 128, 128), num_heads=(2, 4, 4, 4),
                              img_size=64),
    "pit_ti_224": lambda: timm.create_model("pit_ti_224", depth=(1, 1, 1), img_size=112),
    "twins_svt_small": lambda: timm.create_model("twins_svt_small", depths=(1, 1, 1, 1), img_size=64),
    "pvt_v2_b0": lambda: timm.create_model("pvt_v2_b0", depths=(1, 1, 1, 1)),
    "coat_lite_tiny": lambda: timm.create_model("coat_lite_tiny", serial_depths=(1, 1, 1, 1), img_size=64),
    "convit_tiny": lambda: timm.create_model("convit_tiny", depth=2, local_up_to_layer=1, img_size=64),
    "deit3_small_patch16_224": lambda: timm.create_model("deit3_small_patch16_224", depth=2, img_size=64),
    "efficientformerv2_s0": lambda: timm.create_model("efficientformerv2_s0", depths=(1, 1, 1, 1), img_size=64),
    "mvitv2": lambda: mvitv2.MultiScaleVit(cfg=mvitv2.MultiScaleVitCfg(depths=(1, 1, 1, 1), embed_dim=32,
                                                                     num_heads=1), img_size=64),
    "samvit_base_patch16": lambda: timm.create_model("samvit_base_patch16", depth=2, embed_dim=64, num_heads=2,
                                                     img_size=64, global_attn_indexes=(1,), window_size=2),
    "naflexvit_base_patch16_map": lambda: timm.create_model("naflexvit_base_patch16_map", depth=2, embed_dim=64,
                                                            num_heads=2, img_size=64),
    "vit_base_patch16_siglip_224": lambda: timm.create_model("vit_base_patch16_siglip_224", depth=2,
                                                             embed_dim=64, num_heads=2, img_size=64),
    "vit_relpos_base_patch16_clsgap_224": lambda: timm.create_model(
        "vit_relpos_base_patch16_clsgap_224", depth=2, embed_dim=64, num_heads=2, img_size=64),
    "vit_base_patch16_rope_mixed_224": lambda: timm.create_model(
        "vit_base_patch16_rope_mixed_224", depth=2, embed_dim=64, num_heads=2, img_size=64),
    "vit_small_patch16_18x2_224": lambda: timm.create_model("vit_small_patch16_18x2_224", depth=2, embed_dim=64,
                                                            num_heads=2, img_size=64),
    "gmlp": lambda: mlp_mixer.MlpMixer(num_blocks=2, embed_dim=64, mlp_ratio=6, img_size=64,
                                       block_layer=mlp_mixer.SpatialGatingBlock,
                                       mlp_layer=timm.layers.GatedMlp),
    "mambaout_femto": lambda: timm.create_model("mambaout_femto", depths=(1, 1, 1, 1), dims=(16, 32, 64, 128)),
    # a DCT stem split into three convolutions (one component pooled at three nodes), sigmoid-gated spatial
    # attention on each block, layer norms over one channel
    "csatv2": lambda: timm.create_model("csatv2", dims=(16, 24, 32, 48), depths=(1, 1, 2, 2),
                                        transformer_depths=(0, 0, 1, 1)),
    # max-pooled shortcuts between stages: decomposed from the last one on (cut_nonlinear_trunk)
    "hiera_tiny_224": lambda: timm.create_model("hiera_tiny_224", stages=(1, 1, 1, 1), embed_dim=16, num_heads=1,
                                                img_size=(64, 64)),
    "davit_tiny": lambda: timm.create_model("davit_tiny", depths=(1, 1, 1, 1), embed_dims=(16, 32, 48, 64),
                                            num_heads=(1, 2, 2, 2)),
    "gcvit": lambda: gcvit.GlobalContextVit(depths=(1, 1, 1, 1), embed_dim=16, num_heads=(1, 2, 2, 2), img_size=64),
    "efficientformer_l1": lambda: timm.create_model("efficientformer_l1", depths=(1, 1, 1, 1),
                                                    embed_dims=(16, 32, 48, 64), num_vit=1),
    "levit_128s": lambda: timm.create_model("levit_128s", img_size=64, depth=(1, 1, 1), embed_dim=(32, 48, 64),
                                            num_heads=(2, 2, 2)),
}
# options a family needs (see the family's comment), and image sizes of models that take no img_size
# LeViT: a hardswish in each attention downsampling, between residual blocks
OPTIONS = {"hiera_tiny_224": dict(cut_nonlinear_trunk=True), "levit_128s": dict(cut_nonlinear_trunk=True)}
# csatv2 at 128: its stem's output is pooled early; efficientformer_l1's attention biases fix its input size
IMAGE_SIZES = {"csatv2": 128, "efficientformer_l1": 224}


def _image_size(model) -> int:
    for module in model.modules():  # the size the model was built for
        size = getattr(module, "img_size", None)
        if isinstance(size, int) or (isinstance(size, (tuple, list)) and len(size) == 2):
            return size if isinstance(size, int) else size[0]
    return 64


@pytest.mark.parametrize("family", list(FAMILIES))
def test_unnamed_architecture_is_exactly_decomposed(family):
    from decompose import trace_and_decompose

    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    size = IMAGE_SIZES.get(family) or _image_size(model)
    images = torch.randn(2, 3, size, size)
    model(images)  # run first, gradients on, as a user would have: fills eval-mode caches (LeViT, EfficientFormer)
    decomposer = trace_and_decompose(model, **OPTIONS.get(family, {}))
    for level in ("branch", "head"):
        dec = decomposer(images, level=level)
        assert dec.relative_error() <= 1e-5, (level, dec.relative_error())
        if level == "branch":  # nothing read from memory that was never written
            assert torch.equal(decomposer(images, level=level).components, dec.components)
    assert len(set(dec.keys)) == len(dec.keys)
    if dec.stopped_before is None:
        with torch.no_grad():
            expected = model.forward_head(model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(dec.representation, expected, rtol=1e-6, atol=1e-6)
