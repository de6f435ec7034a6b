"""Property-based tests of ``trace_and_decompose`` over generated tiny timm models.

Every test draws a random architecture (ViT or Swin) plus random weights and images,
and checks a property that must hold for *any* such model:

* additivity: the components sum to the representation, and the representation is the
  model's own pre-logits output;
* refinement: the heads of an attention branch sum to the branch, the source tokens of a
  head sum to the head, and nothing but attention components changes between levels;
* batch independence: decomposing a batch equals decomposing each image alone;
* labels: unique, and the same for any batch and any trace of the same model;
* purity: the user's model is left exactly as it was.

Models and images are float64 so that tolerances can be tight (1e-10 relative); one
float32 check uses 1e-5. The whole file runs in about a minute on 2 CPU cores.
"""
from __future__ import annotations

import warnings
from collections import defaultdict

import pytest
import timm
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from decompose import trace_and_decompose

LEVELS = ("branch", "head", "token")
REL64 = 1e-10  # float64 relative tolerance
REL32 = 1e-5   # float32 relative tolerance

PROPERTY_SETTINGS = settings(
    max_examples=8,
    deadline=None,
    database=None,  # write nothing into the repository; failures print a reproduction blob
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# --------------------------------------------------------------------------- strategies
@st.composite
def vit_configs(draw):
    """Keyword arguments of a tiny ``timm`` VisionTransformer (plus seed, noise, batch)."""
    embed_dim = draw(st.sampled_from([16, 24, 32, 40, 48]))
    num_heads = draw(st.sampled_from([h for h in (1, 2, 3, 4, 6, 8) if embed_dim % h == 0 and embed_dim // h >= 4]))
    patch_size = draw(st.sampled_from([4, 8, 16]))
    grids = [g for g in range(1, 7) if 16 <= g * patch_size <= 48]
    img_size = patch_size * draw(st.sampled_from(grids))
    class_token = draw(st.booleans())
    global_pool = draw(st.sampled_from(["token", "avg", "map"]))
    assume(class_token or global_pool != "token")  # timm: token pooling needs the class token
    kwargs = dict(
        depth=draw(st.integers(1, 3)),
        embed_dim=embed_dim,
        num_heads=num_heads,
        patch_size=patch_size,
        img_size=img_size,
        class_token=class_token,
        global_pool=global_pool,
        reg_tokens=draw(st.integers(0, 4)),
        init_values=draw(st.one_of(st.none(), st.floats(1e-5, 0.1))),
        qkv_bias=draw(st.booleans()),
        pre_norm=draw(st.booleans()),
        fc_norm=draw(st.sampled_from([None, True, False])),
        no_embed_class=draw(st.booleans()),
        num_classes=7,
    )
    return _case(draw, "vit", kwargs)


@st.composite
def swin_configs(draw):
    """Keyword arguments of a tiny Swin v1, with and without window padding and shifts."""
    embed_dim = draw(st.sampled_from([16, 24, 32]))
    stages = draw(st.integers(1, 2))
    depths = tuple(draw(st.integers(1, 2)) for _ in range(stages))
    num_heads = tuple(
        draw(st.sampled_from([h for h in (1, 2, 4) if (embed_dim * 2 ** i) % h == 0]))
        for i in range(stages))
    patch_size = draw(st.sampled_from([2, 4]))
    grid = draw(st.sampled_from([g for g in range(4, 11) if 16 <= g * patch_size <= 48]))
    # padded: the first stage's feature map is not a multiple of the window (timm pads in
    # SwinTransformerBlock._attn); windows smaller than the map also give shifted blocks
    padded = draw(st.booleans())
    windows = [w for w in range(2, 6) if w < grid and (grid % w != 0) == padded]
    assume(windows)
    kwargs = dict(
        embed_dim=embed_dim,
        depths=depths,
        num_heads=num_heads,
        patch_size=patch_size,
        img_size=grid * patch_size,
        window_size=draw(st.sampled_from(windows)),
        qkv_bias=draw(st.booleans()),
        drop_path_rate=0.0,  # deterministic in train mode too (purity test)
        num_classes=7,
    )
    return _case(draw, "swin", kwargs)


def _case(draw, family: str, kwargs: dict) -> dict:
    return dict(
        family=family,
        kwargs=kwargs,
        seed=draw(st.integers(0, 2**31 - 1)),
        # weight noise added on top of timm's init so that biases, tokens, norms are non-trivial
        noise=draw(st.sampled_from([0.0, 0.05, 0.3])),
        batch=draw(st.integers(1, 3)),
    )


FAMILIES = pytest.mark.parametrize("configs", [vit_configs(), swin_configs()], ids=["vit", "swin"])


# --------------------------------------------------------------------------- helpers
MODEL_NAMES = {"vit": "vit_tiny_patch16_224", "swin": "swin_tiny_patch4_window7_224"}


def build(case: dict, dtype=torch.float64) -> torch.nn.Module:
    """The model of ``case`` in eval mode, with seeded weights."""
    torch.manual_seed(case["seed"])
    model = timm.create_model(MODEL_NAMES[case["family"]], pretrained=False, **case["kwargs"])
    model = model.to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("gamma"):  # layer scale: keep its (init_values) magnitude
                parameter.mul_(1 + case["noise"] * torch.randn_like(parameter))
            else:
                parameter.add_(case["noise"] * torch.randn_like(parameter))
    return model


def images_for(model: torch.nn.Module, case: dict, batch: int | None = None, dtype=torch.float64,
               seed_offset: int = 0) -> torch.Tensor:
    size = case["kwargs"]["img_size"]
    generator = torch.Generator().manual_seed(case["seed"] + 1 + seed_offset)
    return torch.randn(batch or case["batch"], 3, size, size, dtype=dtype, generator=generator)


def pre_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(images), pre_logits=True)


def assert_parts_sum(parts: torch.Tensor, whole: torch.Tensor, rel: float, what: str) -> None:
    """``parts.sum(0) == whole`` up to ``rel`` times the floating-point scale of the sum."""
    assert parts.shape[1:] == whole.shape, f"{what}: shapes {tuple(parts.shape)} vs {tuple(whole.shape)}"
    scale = float(parts.abs().sum(0).max()) + float(whole.abs().max())
    error = float((parts.sum(0) - whole).abs().max())
    assert error <= rel * max(scale, 1e-300), f"{what}: max error {error:.3e} for scale {scale:.3e}"


def attention_groups(dec, by) -> dict:
    """Row indices of attention components grouped by ``by(label)``."""
    groups = defaultdict(list)
    for i, label in enumerate(dec.labels):
        if label.kind == "attention":
            groups[by(label)].append(i)
    return groups


def non_attention(dec) -> tuple[list[str], torch.Tensor]:
    rows = [i for i, label in enumerate(dec.labels) if label.kind != "attention"]
    return [dec.labels[i].key for i in rows], dec.components[rows]


def assert_only_attention_refined(coarse, fine) -> None:
    """A finer level splits attention components only: every other component is unchanged."""
    coarse_keys, coarse_rest = non_attention(coarse)
    fine_keys, fine_rest = non_attention(fine)
    assert fine_keys == coarse_keys
    assert_parts_sum(fine_rest[None], coarse_rest, REL64, "non-attention components")


def check_token_indices(model: torch.nn.Module, name: str, head: int, tokens: list[int]) -> None:
    """The token indices of one head are 0..n-1, with n at least the keys the head attends over."""
    n, where = len(tokens), f"{name}.h{head}"
    assert sorted(tokens) == list(range(n)), f"{where}: token indices {sorted(tokens)}"
    attention = model.get_submodule(name)
    if hasattr(attention, "window_area"):
        # Swin: a token per key of a window at least (the library may number tokens by their
        # position in the padded feature map, which covers every window)
        assert n >= attention.window_area, f"{where}: {n} tokens for windows of {attention.window_area} keys"
    else:
        # global attention: one token per key of the sequence
        assert n == model.patch_embed.num_patches + model.num_prefix_tokens, f"{where}: {n} tokens"


# --------------------------------------------------------------------------- properties
@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data())
def test_strategy_configs_build_and_run(configs, data):
    """Every drawn config is a valid timm model that runs forward."""
    case = data.draw(configs, label="case")
    model = build(case)
    images = images_for(model, case)
    out = pre_logits(model, images)
    assert out.shape == (case["batch"], model.num_features)
    assert torch.isfinite(out).all()


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data())
def test_components_sum_to_the_real_representation(configs, data):
    case = data.draw(configs, label="case")
    model = build(case)
    images = images_for(model, case)
    expected = pre_logits(model, images)
    decomposer = trace_and_decompose(model)
    for level in LEVELS:
        assert_sums_to(decomposer(images, level=level), expected, level)


def assert_sums_to(dec, expected: torch.Tensor, level: str) -> None:
    """Additivity at ``level``: the representation is the model's ``expected`` output and the components sum to it."""
    assert dec.level == level
    assert dec.stopped_before is None, f"{level}: representation moved before {dec.stopped_before}"
    # to float64 rounding: torch's attention kernels round differently by batch size and memory layout
    # (a MAP-pooled ViT's own output for image 0 differs by 3e-18 between batch 1 and batch 2)
    torch.testing.assert_close(dec.representation, expected, rtol=1e-12, atol=1e-15,
                               msg=lambda m: f"{level}: representation differs from the model's pre-logits "
                                             f"output: {m}")
    assert dec.components.shape == (len(dec.labels),) + tuple(expected.shape)
    assert dec.components.dtype == torch.float64
    assert dec.relative_error() <= REL64, f"{level}: relative error {dec.relative_error():.3e}"
    assert_parts_sum(dec.components, expected, REL64, f"{level} components")


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data())
def test_heads_sum_to_their_attention_branch(configs, data):
    case = data.draw(configs, label="case")
    model = build(case)
    images = images_for(model, case)
    decomposer = trace_and_decompose(model)
    assert_heads_sum_to_branch(model, decomposer(images, level="branch"), decomposer(images, level="head"))


def assert_heads_sum_to_branch(model: torch.nn.Module, branch, head) -> None:
    """Refinement branch -> head: an attention branch's heads are all its heads and sum to it."""
    branch_attention = attention_groups(branch, lambda label: label.name)
    head_attention = attention_groups(head, lambda label: label.name)
    assert branch_attention, "no attention branch found"
    assert set(head_attention) == set(branch_attention)
    for name, rows in branch_attention.items():
        assert len(rows) == 1 and branch.labels[rows[0]].head is None and branch.labels[rows[0]].key == name
        heads = [head.labels[i].head for i in head_attention[name]]
        assert sorted(heads) == list(range(model.get_submodule(name).num_heads)), f"{name}: heads {heads}"
        assert_parts_sum(head.components[head_attention[name]], branch.components[rows[0]], REL64,
                         f"heads of {name}")
    assert_only_attention_refined(branch, head)


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data())
def test_tokens_sum_to_their_head(configs, data):
    case = data.draw(configs, label="case")
    model = build(case)
    images = images_for(model, case)
    decomposer = trace_and_decompose(model)
    assert_tokens_sum_to_head(model, decomposer(images, level="head"), decomposer(images, level="token"))


def assert_tokens_sum_to_head(model: torch.nn.Module, head, token) -> None:
    """Refinement head -> token: a head's source tokens are numbered 0..n-1 and sum to it."""
    head_rows = attention_groups(head, lambda label: (label.name, label.head))
    token_rows = attention_groups(token, lambda label: (label.name, label.head))
    assert set(token_rows) == set(head_rows)
    for (name, h), rows in token_rows.items():
        (head_row,) = head_rows[name, h]
        assert head.labels[head_row].token is None
        check_token_indices(model, name, h, [token.labels[i].token for i in rows])
        assert_parts_sum(token.components[rows], head.components[head_row], REL64, f"tokens of {name}.h{h}")
    assert_only_attention_refined(head, token)


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data(), level=st.sampled_from(LEVELS))
def test_batch_equals_images_alone(configs, data, level):
    case = data.draw(configs, label="case")
    model = build(case)
    images = images_for(model, case, batch=max(case["batch"], 2))
    decomposer = trace_and_decompose(model)
    together = decomposer(images, level=level)
    for i in range(images.shape[0]):
        alone = decomposer(images[i:i + 1], level=level)
        assert alone.keys == together.keys
        assert_parts_sum(alone.components[None, :, 0], together.components[:, i], REL64, f"image {i} components")
        assert_parts_sum(alone.representation[None, 0], together.representation[i], REL64,
                         f"image {i} representation")


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data())
def test_labels_are_unique_and_stable(configs, data):
    case = data.draw(configs, label="case")
    model = build(case)
    first, second = trace_and_decompose(model), trace_and_decompose(model)
    batch_a = images_for(model, case)
    batch_b = 3 * images_for(model, case, batch=case["batch"] % 3 + 1, seed_offset=1000)
    for level in LEVELS:
        keys = first(batch_a, level=level).keys
        assert len(set(keys)) == len(keys), f"{level}: duplicate keys " \
            f"{sorted(k for k in set(keys) if keys.count(k) > 1)}"
        assert first(batch_b, level=level).keys == keys
        assert second(batch_a, level=level).keys == keys


@FAMILIES
@PROPERTY_SETTINGS
@given(data=st.data(), train_mode=st.booleans(), freeze=st.integers(0, 2**16))
def test_user_model_is_not_modified(configs, data, train_mode, freeze):
    case = data.draw(configs, label="case")
    model = build(case)
    parameters = list(model.parameters())
    mask = torch.randint(0, 2, (len(parameters),), generator=torch.Generator().manual_seed(freeze))
    for parameter, keep in zip(parameters, mask.tolist()):
        parameter.requires_grad_(bool(keep))
    model.train(train_mode)
    images = images_for(model, case)

    def snapshot():
        with torch.no_grad():
            output = model(images)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return (output, state, [m.training for m in model.modules()],
                [(n, p.requires_grad, p.dtype, p.grad) for n, p in model.named_parameters()])

    output, state, training, params = snapshot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # train mode is reported with a warning
        decomposer = trace_and_decompose(model)
    for level in LEVELS:
        decomposer(images, level=level)
    output_after, state_after, training_after, params_after = snapshot()

    assert torch.equal(output_after, output)
    assert state_after.keys() == state.keys()
    assert all(torch.equal(state_after[k], state[k]) for k in state)
    assert model.training == train_mode and training_after == training
    assert params_after == params
    assert list(model.parameters()) == parameters  # the same Parameter objects


# --------------------------------------------------------------------------- float32 examples
FLOAT32_CASES = {
    "vit-regs-avg-layerscale": dict(family="vit", seed=3, noise=0.05, batch=2, kwargs=dict(
        depth=2, embed_dim=32, num_heads=4, patch_size=8, img_size=32, class_token=True, global_pool="avg",
        reg_tokens=2, init_values=0.1, qkv_bias=True, pre_norm=False, fc_norm=None, no_embed_class=False,
        num_classes=7)),
    "swin-padded-shifted": dict(family="swin", seed=5, noise=0.05, batch=2, kwargs=dict(
        embed_dim=16, depths=(2, 2), num_heads=(2, 4), patch_size=4, img_size=28, window_size=3,
        qkv_bias=True, drop_path_rate=0.0, num_classes=7)),
}


@pytest.mark.parametrize("name", FLOAT32_CASES)
def test_float32_example(name):
    case = FLOAT32_CASES[name]
    model = build(case, dtype=torch.float32)
    images = images_for(model, case, dtype=torch.float32)
    expected = pre_logits(model, images)
    decomposer = trace_and_decompose(model)
    for level in LEVELS:
        dec = decomposer(images, level=level)
        assert dec.components.dtype == torch.float32
        assert torch.equal(dec.representation, expected)
        assert dec.relative_error() <= REL32, f"{level}: relative error {dec.relative_error():.3e}"
    if case["family"] == "swin":  # the case really exercises padding and shifted windows
        blocks = [b for stage in model.layers for b in stage.blocks]
        assert any(any(b.shift_size) for b in blocks)
        assert any(r % w for b in blocks for r, w in zip(b.input_resolution, b.window_size))
