"""Notebook display: a compact HTML table of the top components with a bar plot (``Decomposition._repr_html_``)
and matplotlib figures of component values (``Decomposition.plot``). matplotlib is imported when a figure is
made, never on import."""
from __future__ import annotations

import html
import io
from collections.abc import Sequence

import torch

# ``Decomposition`` in annotations: decompose.decomposition.Decomposition (not imported: it imports this module)


def component_values(dec: Decomposition, image: int | None = None, direction: torch.Tensor | None = None  # noqa: F821 (see above)
                     ) -> torch.Tensor:
    """[C] per component: its norm, or ⟨c_i, direction⟩ for a ``direction`` [D] (e.g. a class's classifier row);
    for one ``image``, else the mean over the batch. A decomposition made with directions gives its scores
    along the first of them."""
    if dec.vectors is None:
        if direction is not None:
            raise ValueError("this decomposition holds scores along its own directions; plot it without direction=")
        scores = dec.scores[..., 0].detach().float()                        # [C, B]
        return (scores if image is None else scores[:, image:image + 1]).mean(1).cpu()
    components = dec.components.flatten(2).detach().float()                 # [C, B, D]
    if image is not None:
        components = components[:, image:image + 1]
    if direction is None:
        values = components.norm(dim=-1)                                     # [C, b]
    else:
        values = components @ direction.detach().float().flatten().to(components.device)
    return values.mean(1).cpu()


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        if isinstance(value, float):
            return f"<td style='text-align:right'>{value:.4g}</td>"
        return f"<td style='text-align:left'>{html.escape(str(value))}</td>"

    head = "".join(f"<th style='text-align:left'>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def bar_figure(names: Sequence[str], values: Sequence[float], title: str = "", x_label: str = "", ax=None):
    """A matplotlib Figure of horizontal bars, the first name on top (``ax``: draw into that Axes instead)."""
    from matplotlib.figure import Figure

    if ax is None:
        figure = Figure(figsize=(6, 0.3 * len(names) + 1.0), layout="constrained")
        ax = figure.add_subplot()
    positions = list(range(len(names)))
    ax.barh(positions, list(values), color=["#3a6ea5" if v >= 0 else "#c05746" for v in values])
    ax.set_yticks(positions, [str(n) for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="#444", linewidth=0.8)
    ax.set_xlabel(x_label)
    ax.set_title(title, fontsize=10)
    return ax.figure


def figure_svg(figure) -> str:
    """Inline ``<svg>`` markup of a matplotlib Figure (text kept as text)."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg")
    markup = buffer.getvalue()
    return markup[markup.index("<svg"):]


def plot_components(dec: Decomposition, top: int = 15, image: int | None = None,  # noqa: F821 (see above)
                    direction: torch.Tensor | None = None, ax=None):
    """Bar chart of the ``top`` components by |value| (see ``component_values``); returns the Figure."""
    values = component_values(dec, image, direction)
    order = values.abs().argsort(descending=True)[:top].tolist()
    what = "⟨component, u_0⟩" if dec.vectors is None else "norm" if direction is None else "⟨component, direction⟩"
    where = f"image {image}" if image is not None else f"mean over {dec.values.shape[1]} images"
    return bar_figure([dec.labels[i].key for i in order], [float(values[i]) for i in order],
                      f"top {len(order)} of {len(dec.labels)} components ({where})", what, ax)


def decomposition_html(dec: Decomposition, top: int = 10) -> str:  # noqa: F821 (see above)
    """Summary line, the ``top`` components by mean norm (by |mean score| with directions; table) and their
    bar plot."""
    values = component_values(dec)
    share = values / values.abs().sum().clamp_min(1e-30)
    order = values.abs().argsort(descending=True)[:top].tolist()
    rows = [[dec.labels[i].key, dec.labels[i].kind, "" if dec.labels[i].layer is None else dec.labels[i].layer,
             float(values[i]), float(share[i])] for i in order]
    error = dec.sum_error if dec.sum_error is not None else dec.relative_error()
    what = "mean norm" if dec.vectors is not None else "mean score along u_0"
    summary = (f"<b>Decomposition</b>: {len(dec.labels)} components × {dec.values.shape[1]} images × "
               f"{tuple(dec.values.shape[2:])}" + (" scores" if dec.vectors is None else "") +
               f", level {html.escape(dec.level)}, Σ components vs representation: "
               f"relative error {error:.1e}" + (f", stopped before {html.escape(dec.stopped_before)}"
                                                if dec.stopped_before else ""))
    table = html_table(["component", "kind", "layer", what, "share of Σ |values|"], rows)
    figure = plot_components(dec, top)
    return (f"<div>{summary}<div style='display:flex;gap:1em;align-items:flex-start'>{table}"
            f"<div style='max-width:520px'>{figure_svg(figure)}</div></div></div>")
