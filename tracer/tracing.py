"""Symbolic tracing of a vision model into a torch.fx graph.

Leaves and autowrapped functions come from timm's own fx registry (the same ones
timm's feature extractor uses). Everything else is traced through, including
torch.nn modules such as ``nn.Linear`` or ``nn.LayerNorm``, so that the graph is
made of torch primitives (``F.linear``, ``F.layer_norm`` ...) whose linear parts
are known. A module whose forward cannot be traced (data-dependent control flow,
e.g. ``nn.MultiheadAttention``) becomes a leaf automatically: the failure is
caught at the innermost module and tracing restarts with that module opaque.
"""
from __future__ import annotations

import copy
import sys
import warnings
from typing import Any

import torch
import torch.fx as fx
from torch import nn

try:  # timm is a dependency, but keep tracing usable for plain torch models
    from timm.layers import _fx as timm_fx
except ImportError:  # pragma: no cover
    timm_fx = None

# prefix of every module path in the traced graph (the wrapped model's attribute)
MODEL_PREFIX = "model."
MAX_TRACE_ATTEMPTS = 64


class TracingError(RuntimeError):
    """The model could not be turned into an fx graph."""


class _InnerModuleFailed(Exception):
    """Raised internally: tracing failed inside ``qualname``; retry with it opaque."""

    def __init__(self, qualname: str, module: nn.Module, error: BaseException):
        super().__init__(qualname)
        self.qualname, self.module, self.error = qualname, module, error


class RepresentationOf(nn.Module):
    """The function whose output is decomposed: timm pre-logits features by default.

    ``output="pre_logits"`` uses timm's ``forward_head(forward_features(x),
    pre_logits=True)`` when the model has them (what ``num_classes=0`` returns),
    otherwise ``model(x)``; ``output="logits"`` is always ``model(x)``.
    """

    def __init__(self, model: nn.Module, output: str = "pre_logits"):
        super().__init__()
        if output not in ("pre_logits", "logits"):
            raise ValueError(f"output must be 'pre_logits' or 'logits', got {output!r}")
        self.model = model
        self.output = output
        self._use_head = output == "pre_logits" and all(
            callable(getattr(model, name, None)) for name in ("forward_features", "forward_head"))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self._use_head:
            return self.model.forward_head(self.model.forward_features(images), pre_logits=True)
        return self.model(images)


def _timm_leaf_types() -> tuple[type, ...]:
    return tuple(timm_fx.get_notrace_modules()) if timm_fx else ()


def _timm_autowrap_functions() -> tuple:
    return tuple(timm_fx.get_notrace_functions()) if timm_fx else ()


def _is_torch_nn_module(module: nn.Module) -> bool:
    return type(module).__module__.startswith("torch.nn")


class ComponentTracer(fx.Tracer):
    """fx tracer with timm's leaves, torch.nn modules traced through, and learned leaves.

    ``opaque_types`` / ``opaque_paths`` hold modules found untraceable on earlier
    attempts: torch.nn types are made opaque by type, other modules by path.
    """

    def __init__(self, opaque_types: set[type], opaque_paths: set[str]):
        super().__init__(autowrap_functions=_timm_autowrap_functions())
        self.timm_leaf_types = _timm_leaf_types()
        self.opaque_types = opaque_types
        self.opaque_paths = opaque_paths

    def trace(self, root, concrete_args=None):
        # timm's helper functions are autowrapped only where fx looks for them: the globals of
        # modules whose forward it enters through Module.__call__. RepresentationOf calls the
        # model's forward_features directly, so add every submodule's Python module.
        modules = {sys.modules.get(type(m).__module__) for m in root.modules()}
        self._autowrap_search = list(self._autowrap_search) + [m for m in modules if m is not None]
        return super().trace(root, concrete_args)

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        if isinstance(module, self.timm_leaf_types):
            return True
        if isinstance(module, nn.MultiheadAttention):  # a torch primitive with its own rule
            return True
        if type(module) in self.opaque_types or qualname in self.opaque_paths:
            return True
        return False

    def call_module(self, module, forward, args, kwargs):
        if self.is_leaf_module(module, self.path_of_module(module)):
            return super().call_module(module, forward, args, kwargs)
        try:
            return super().call_module(module, forward, args, kwargs)
        except _InnerModuleFailed:
            raise
        except Exception as error:  # the innermost failing module is reported
            raise _InnerModuleFailed(self.path_of_module(module), module, error) from error


def trace_representation(model: nn.Module, output: str = "pre_logits") -> tuple[fx.GraphModule, list[str]]:
    """Trace ``RepresentationOf(model, output)``.

    Returns the GraphModule (sharing the parameters of ``model``) and the module
    paths (without the ``model.`` prefix) that had to be made opaque.
    """
    root = RepresentationOf(model, output)
    opaque_types: set[type] = set()
    opaque_paths: set[str] = set()
    learned: list[str] = []
    reasons: list[str] = []
    for _ in range(MAX_TRACE_ATTEMPTS):
        tracer = ComponentTracer(opaque_types, opaque_paths)
        try:
            graph = tracer.trace(root)
        except _InnerModuleFailed as failure:
            if failure.qualname in ("", "model"):
                raise _tracing_error(failure.qualname, failure.module, failure.error) from failure.error
            if _is_torch_nn_module(failure.module):
                opaque_types.add(type(failure.module))
            else:
                opaque_paths.add(failure.qualname)
            learned.append(failure.qualname.removeprefix(MODEL_PREFIX))
            if not _is_torch_nn_module(failure.module):  # torch's own modules (BatchNorm ...) are expected
                reasons.append(f"{learned[-1]} ({type(failure.module).__name__}: {type(failure.error).__name__})")
            continue
        except Exception as error:
            raise _tracing_error("", root, error) from error
        if reasons:
            warnings.warn("torch.fx could not trace into " + "; ".join(reasons) + ". These modules are "
                          "opaque: decomposed as a whole (one component, or an affine op on the trunk).",
                          stacklevel=3)
        return fx.GraphModule(root, graph, class_name="TracedRepresentation"), learned
    raise TracingError(f"gave up after making {len(learned)} modules opaque: {learned}")


def _tracing_error(qualname: str, module: nn.Module, error: BaseException) -> TracingError:
    inner = qualname.removeprefix(MODEL_PREFIX)
    where = "the model's own forward" if inner in ("", "model") else inner
    return TracingError(
        f"torch.fx could not trace {where} ({type(module).__name__}): "
        f"{type(error).__name__}: {error}. Tracing needs forward code without Python control "
        "flow on tensor values; register the offending function with "
        "timm.layers.register_notrace_function or the module with "
        "timm.layers.register_notrace_module and trace again.")


def frozen_eval_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode without gradients: the user's model is never touched."""
    if model.training:
        warnings.warn(
            "the model is in train mode (dropout, drop-path and batch statistics make its "
            "output random); vit-decompose decomposes an eval-mode copy and leaves your "
            "model as it is. Call model.eval() to silence this warning.", stacklevel=3)
    copied = copy.deepcopy(model, _detached_caches(model))
    copied.eval()
    copied.requires_grad_(False)
    return copied


def _detached_caches(model: nn.Module) -> dict[int, torch.Tensor]:
    """A deepcopy memo mapping every tensor with autograd history that a module keeps as a plain
    attribute (LeViT's, EfficientFormer's and TinyViT's eval-mode attention-bias caches, filled by
    a forward with gradients on) to a detached clone: deepcopy refuses such tensors."""
    memo: dict[int, torch.Tensor] = {}

    def visit(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.grad_fn is not None:
                memo[id(value)] = value.detach().clone()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    for module in model.modules():
        for name, value in vars(module).items():
            if name not in ("_parameters", "_buffers", "_modules"):
                visit(value)
    return memo


def module_path(node: fx.Node) -> str:
    """Module path (``blocks.3.attn``) of the innermost module that created ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    if node.op == "call_module":
        return str(node.target).removeprefix(MODEL_PREFIX)
    if not stack:
        if node.op == "get_attr":
            return str(node.target).removeprefix(MODEL_PREFIX)
        return ""
    path = list(stack.values())[-1][0]
    return str(path).removeprefix(MODEL_PREFIX).removeprefix("model")


def module_stack(node: fx.Node) -> list[str]:
    """Paths of all modules active when ``node`` was created, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(path).removeprefix(MODEL_PREFIX) for path, _ in stack.values()]
    return [p for p in paths if p and p != "model"]


def describe(node: fx.Node) -> str:
    """``node 'gelu_3' (F.gelu in module blocks.3.mlp.act)`` for error messages."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    where = module_path(node) or "the model's forward"
    return f"node {node.name!r} ({node.op} {target} in module {where})"


def call_target(node: fx.Node, gm: fx.GraphModule, args: tuple, kwargs: dict) -> Any:
    """Evaluate ``node``'s operation on explicit arguments."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)
    if node.op == "call_module":
        return gm.get_submodule(node.target)(*args, **kwargs)
    raise ValueError(f"cannot call {node.op} node {node.name}")
