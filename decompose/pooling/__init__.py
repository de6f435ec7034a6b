"""Early pooling: an average-pooled output reached through a linear tail, run on a few tokens.

After a component joins the trunk of an average-pooled model (Swin, MaxViT, ConvNeXt) at node ``n``,
the rest of its way to the output is one linear map ``L_n``: the trunk's ops with the norm scales
frozen. Carrying every component through ``L_n`` at full resolution costs a pass of the later stages
per component. But tokens enter ``L_n`` only through per-token frozen scalars (norm scales, the pool's
``1/N``) and token merges, so

    L_n(c) = T_n(pool_n(c)),      pool_n(c)[r] = Σ_{t : slot(t) = r} γ_t · c[t]

* ``T_n``, the **unit tail** (``unit_tail``): the same trunk ops run on a small token grid, with every
  data-dependent per-token scale set to 1 (a layer norm keeps its centring and weight) and biases
  dropped (they are components of their own);
* ``slot(t)``: the small-grid token that real token ``t`` plays;
* ``γ_t``: the frozen scalars along ``t``'s path, per image: a product of the trunk norms' per-row
  scales where that formula holds (``norm_scales``, checked on two images when planning), else read
  off one adjoint of the batch at hand (``EarlyPooling.weights``).

Nothing here knows a model: token axes are the axes whose size the output does not depend on, the
small grid is the period of which tokens the real tail treats alike, and the claim is verified on the
probe image (``pooled_nodes``). The modules:

* ``layout``: the records (``PooledNode``, ``EarlyPooling``, ``PooledBranch`` and its ``RowStep``s);
* ``unit_tail``: the trunk on the small grid;
* ``pooled_nodes``: finding where to pool (``early_pooling_for`` plans it for a decomposer);
* ``branches``: branches pooled inside the branch (attention heads and source tokens never made
  at full size);
* ``norm_scales``: γ without a backward pass;
* ``parking``: the per-batch run inside the components pass (``Parking``);
* ``gathering``: the parked components taken to the output (``pooled_components``).
"""
from .gathering import pooled_components
from .layout import EarlyPooling, PooledBranch, PooledNode, RowStep
from .parking import Parking, branches_for_level
from .pooled_nodes import early_pooling_for

__all__ = ["EarlyPooling", "PooledBranch", "PooledNode", "RowStep", "Parking", "branches_for_level",
           "early_pooling_for", "pooled_components"]
