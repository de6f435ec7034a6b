"""Which grid cells each attention key reads, in few backward passes (adaptive group testing).

Key ``k``'s support is the set of grid cells ``(h, w)`` where the gradient of
``⟨embedding, r ⊙ [element key = k]⟩`` (``r`` random) is nonzero in some channel. A backward pass whose
direction keeps the elements of a set ``S`` of keys tells, per cell, whether some key of ``S`` reaches it
(a random direction does not cancel exactly), so keys are tested in groups:

* a group of ``n`` keys takes ``2·⌈log2 n⌉`` passes: for each bit of a key's number in the group, one pass
  over the keys whose bit is set and one over the others. A cell that exactly one key of the group reaches
  is positive in exactly one pass of each pair, and those passes spell the key. A cell positive in both
  passes of some pair is reached by several keys, each of them among its candidates (the keys all of whose
  passes are positive there);
* a key that is no such cell's candidate reaches only cells that it alone reaches: its support is exactly
  the cells that spell it (resolved). The others are tested again in new groups.

Which keys share a group decides only the cost, never the result (the test is exact, and a key alone in its
group, one pass of its own, is always resolved). Keys whose supports are disjoint make groups without
shared cells, so groups are chosen from where the keys are: a first locating round reads some cells of
most keys (``_located_cells``), and ``_GroupLayout`` colours keys whose possible regions meet apart. When
receptive fields overlap so much that grouping cannot pay (most keys reach most cells), keys get one pass
each.

Measured 2026-12-05: MaxViT-T at 224 (3,136 keys over a 112×112 grid, each reaching a 4×4 box, no cell
reached by one key alone) takes 243 passes instead of 3,136; DaViT-T's stage-2 keys (196, each reaching most
of the image) one pass each.
"""
from __future__ import annotations

import math

import torch

from .progress import progress
from .support_cells import GridCells, LabelledCells

STAGE = "token key positions: receptive fields"
PER_KEY = 64          # at most this many keys: one pass per key (grouping would not pay)
LOCATING_GROUPS = 8   # random groups of keys in the locating round
DENSE = 0.1           # fewer keys located than this share of the first two locating groups: one pass per key


def key_supports(grid: torch.Tensor, embedding: torch.Tensor, element_keys: torch.Tensor, keys: int
                 ) -> list[torch.Tensor]:
    """Per key, the flat indices (into ``H * W``, ascending) of the grid cells its elements depend on.

    grid: a leaf requiring grad, ``[..., H, W]``; embedding: a function of ``grid``, shaped like
    ``element_keys`` (key + 1 per element, 0: no key). The supports one backward pass per key with the
    same random direction finds (keys with no element: empty).
    """
    return cell_supports(grid, embedding, element_keys, keys, GridCells(grid))[0]


def cell_supports(source: torch.Tensor, embedding: torch.Tensor, element_keys: torch.Tensor, keys: int,
                  cells: GridCells | LabelledCells) -> tuple[list[torch.Tensor], set[int]]:
    """``key_supports`` in the ``cells`` of ``source`` (a tensor requiring grad that ``embedding`` is computed
    from), and the keys that reach some cell only partly (their supports hold those cells too)."""
    generator = torch.Generator().manual_seed(2)
    direction = (torch.rand(embedding.shape, generator=generator, dtype=torch.float64, device="cpu") + 0.5
                 ).to(embedding)
    present = torch.bincount(element_keys.flatten().cpu(), minlength=keys + 1)[1:keys + 1] > 0
    supports = [torch.zeros(0, dtype=torch.long) for _ in range(keys)]
    partly: set[int] = set()
    pending = [k for k in range(keys) if bool(present[k])]
    passes = _Passes(source, embedding, element_keys, keys, cells)
    located = _located_cells(passes, direction, pending) if len(pending) > PER_KEY else None
    known = {key: [found] for key, found in (located or {}).items()}   # pending key -> cells found its own
    layout = _GroupLayout(cells.places, known)
    pooled = set(pending) if located is None else set()                 # keys no more to group unlocated
    while pending:
        groups = layout.next_groups(pending, known, pooled)
        key_sets, tests = _bit_passes(groups)
        reached = [passes.positive_cells(direction, keys) for keys in progress(key_sets, STAGE)]
        positive = torch.stack([cells_reached for cells_reached, _ in reached])             # [passes, cells]
        partial = None if reached[0][1] is None else torch.stack([part for _, part in reached])
        pending = []
        for group, rows, bitwise in tests:
            found, unresolved = (_decode(positive[rows], group) if bitwise
                                 else (dict(zip(group, (row.nonzero().flatten() for row in positive[rows]))), set()))
            for key, cells_found in found.items():
                if key not in unresolved:
                    supports[key] = cells_found
                    if partial is not None and bool(partial[rows][:, cells_found].any()):
                        partly.add(key)   # in its passes no other key reaches these cells
                    continue
                pending.append(key)
                if len(cells_found):
                    known.setdefault(key, []).append(cells_found)
    return supports, partly


class _Passes:
    """Backward passes from the embedding to the source's cells, for directions weighted per key."""

    def __init__(self, source: torch.Tensor, embedding: torch.Tensor, element_keys: torch.Tensor, keys: int,
                 cells: GridCells | LabelledCells):
        self.source, self.embedding, self.element_keys, self.keys = source, embedding, element_keys, keys
        self.cells = cells

    def gradient(self, direction: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Shaped like the source: the gradient of ⟨embedding, direction ⊙ weights[element key]⟩ (weights
        ``[keys]``; elements of no key weigh 0). One backward pass (batching them with vmap was no faster)."""
        per_code = torch.cat([weights.new_zeros(1), weights]).to(self.embedding)
        grad, = torch.autograd.grad(self.embedding, self.source, direction * per_code[self.element_keys],
                                    retain_graph=True)
        return grad

    def positive_cells(self, direction: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[cells]`` bool: the cells some of ``keys`` reaches, and those reached only partly (None: a grid)."""
        weights = torch.zeros(self.keys).index_fill_(0, keys, 1.0)
        return self.cells.reached(self.gradient(direction, weights))


def _located_cells(passes: _Passes, direction: torch.Tensor, pending: list[int]) -> dict[int, torch.Tensor] | None:
    """Some cells of most keys, to place them (None: receptive fields too dense to group).

    Keys in random groups; a cell's key is read from the ratio of the gradients of a coded direction (the
    key's number in its group) and of the plain one, at the cell's largest channel, where two random
    directions agree on one whole number (a cell that one key of the group alone reaches). When most keys
    are read, those left unread (too many keys of their group reach each of their cells) are read again in
    groups four times smaller, while that reads most of them. Only a guess where keys are (grouping uses it, supports do not),
    so the model's dtype is enough; a cell read wrong costs passes, not correctness.
    """
    generator = torch.Generator().manual_seed(3)
    second = (torch.rand(direction.shape, generator=generator, dtype=torch.float64, device="cpu") + 0.5
              ).to(direction)
    order = torch.tensor(pending)[torch.randperm(len(pending), generator=generator)]
    located: dict[int, torch.Tensor] = {}
    for index, group in enumerate(progress(order.tensor_split(LOCATING_GROUPS), STAGE)):
        if index == 2 and sum(len(c) > 0 for c in located.values()) < DENSE * len(located):
            return None
        located.update(_read_keys(passes, (direction, second), group))
    groups = LOCATING_GROUPS
    unlocated = order[torch.tensor([len(located[key]) == 0 for key in order.tolist()], dtype=torch.bool)]
    while PER_KEY < len(unlocated) < len(order) / 2 and groups < len(unlocated):   # smaller groups read more
        groups *= 4
        found: dict[int, torch.Tensor] = {}
        for group in progress(unlocated.tensor_split(min(groups, len(unlocated))), STAGE):
            found.update(_read_keys(passes, (direction, second), group))
        located.update(found)
        still = torch.tensor([len(found[key]) == 0 for key in unlocated.tolist()], dtype=torch.bool)
        if 2 * int(still.sum()) > len(unlocated):                    # most still unread: too dense
            break
        unlocated = unlocated[still]
    return {key: cells for key, cells in located.items() if len(cells)}


def _read_keys(passes: _Passes, directions: tuple[torch.Tensor, torch.Tensor], group: torch.Tensor
               ) -> dict[int, torch.Tensor]:
    """Per key of ``group``, the cells read as its own (four passes: plain and coded in two directions)."""
    tolerance = 64 * torch.finfo(directions[0].dtype).eps    # relative error of a ratio where one key alone acts
    codes = torch.zeros(passes.keys)
    codes[group] = torch.arange(1, len(group) + 1, dtype=codes.dtype)
    numbers = []
    for random_direction in directions:
        plain = passes.gradient(random_direction, (codes > 0).to(codes))
        ratio = passes.cells.ratio(plain, passes.gradient(random_direction, codes))     # [cells]
        number = ratio.round()
        whole = (ratio - number).abs() <= tolerance * number.abs()
        numbers.append(torch.where(whole, number, torch.full_like(number, -1)))
    agreed = (numbers[0] == numbers[1]) & (numbers[0] >= 1) & (numbers[0] <= len(group))
    cells = _cells_by_code(agreed.nonzero().flatten(), numbers[0][agreed].long() - 1, len(group))
    return dict(zip(group.tolist(), cells))


def _cells_by_code(cells: torch.Tensor, codes: torch.Tensor, count: int) -> tuple[torch.Tensor, ...]:
    """``cells`` (ascending) split by their ``codes`` (0 .. count - 1), ascending within each code."""
    order = torch.argsort(codes, stable=True)
    return torch.split(cells[order], torch.bincount(codes, minlength=count).tolist())


def _pass_count(size: int) -> int:
    """Passes to test a group of ``size`` keys: two per bit of their numbers, or one per key if fewer."""
    bits = math.ceil(math.log2(size)) if size > 1 else 0
    return min(2 * bits, size) if size > 1 else size


def _bit_passes(groups: list[list[int]]) -> tuple[list[torch.Tensor], list[tuple[list[int], slice, bool]]]:
    """The keys of every pass, and per group (its keys, its passes, coded by bits or one pass per key)."""
    passes: list[torch.Tensor] = []
    tests = []
    for group in groups:
        keys = torch.tensor(group)
        bitwise = _pass_count(len(group)) < len(group)
        start = len(passes)
        if bitwise:
            codes = torch.arange(len(group))
            for bit in range(_pass_count(len(group)) // 2):
                is_set = (codes >> bit) & 1 == 1
                passes += [keys[is_set], keys[~is_set]]
        else:
            passes += list(keys.split(1))
        tests.append((group, slice(start, len(passes)), bitwise))
    return passes, tests


def _decode(positive: torch.Tensor, group: list[int]) -> tuple[dict[int, torch.Tensor], set[int]]:
    """From a group's bit passes ``[2 * bits, cells]`` (set, unset per bit): per key the cells it alone
    reaches, and the keys that may reach a cell another key also reaches (the unresolved)."""
    bits = len(positive) // 2
    is_set, unset = positive[0::2], positive[1::2]                             # [bits, cells]
    reached = is_set[0] | unset[0]
    alone = reached & (is_set ^ unset).all(0)
    weights = 1 << torch.arange(bits)
    spelled = (is_set[:, alone].long() * weights[:, None]).sum(0)              # the number of a cell's key
    found = dict(zip(group, _cells_by_code(alone.nonzero().flatten(), spelled, len(group))))
    shared = reached & ~alone
    if not bool(shared.any()):
        return found, set()
    full = (1 << bits) - 1
    patterns = torch.stack([(is_set[:, shared].long() * weights[:, None]).sum(0),
                            (unset[:, shared].long() * weights[:, None]).sum(0)], 1).unique(dim=0)
    codes = torch.arange(len(group))
    candidate = torch.zeros(len(group), dtype=torch.bool)
    for block in patterns.split(max(1, 2 ** 22 // len(group))):           # [patterns, 2]: set bits, unset bits
        set_ok = (codes[None] & ~block[:, :1]) == 0
        unset_ok = (~codes[None] & full & ~block[:, 1:]) == 0
        candidate |= (set_ok & unset_ok).any(0)
    return found, {k for k, c in zip(group, candidate.tolist()) if c}


class _GroupLayout:
    """Where pending keys may reach, from the box around their known cells, and the groups of a round.

    A key's known cells are some of its support, whose box is at most ``2 * half`` wide per axis
    (``half``: the largest half size of a known box): the support lies in the known box grown to that
    size on both sides. Two keys conflict when these regions meet. A key that stays unresolved grows its
    region by a margin (1, 2, 4, ... cells) each round. Known cells far from the rest of their key's
    (a located cell read wrong) are left out of its box; cells without a place (not finite) are not
    counted as known."""

    def __init__(self, places: torch.Tensor, known: dict[int, list[torch.Tensor]]):
        self.places = places                                            # [cells, 2] (row, col)
        self.margin: dict[int, float] = {}
        placed = [cells for cells in known.values() if self._located(cells)]
        halves = [self._box(self._points(cells))[1] for cells in placed]
        typical = float(torch.stack(halves).amax(1).median()) if halves else 0.0
        self.outlier = 4 * typical + 2      # cells farther than this from their key's median cell
        trimmed = [self._box(self._points(cells, trim=True))[1] for cells in placed]
        self.half = torch.stack(trimmed).amax(0) if trimmed else torch.zeros(2, dtype=torch.float64)

    def next_groups(self, pending: list[int], known: dict[int, list[torch.Tensor]], pooled: set[int]
                    ) -> list[list[int]]:
        """Located keys coloured apart (one pass each when the colouring would take more than half as many
        passes); keys with no known cell in one group the first time (when many), else alone."""
        located = [key for key in pending if self._located(known.get(key))]
        groups = self._colouring([self._region(key, known[key]) for key in located])
        if 2 * sum(_pass_count(len(group)) for group in groups) > len(located):
            groups = [[key] for key in located]
        unlocated = [key for key in pending if not self._located(known.get(key))]
        fresh = [key for key in unlocated if key not in pooled]
        if len(fresh) > PER_KEY:
            pooled.update(fresh)
            return groups + [fresh] + [[key] for key in unlocated if key not in set(fresh)]
        return groups + [[key] for key in unlocated]

    def _region(self, key: int, cells: list[torch.Tensor]) -> tuple[float, float, int, torch.Tensor]:
        """(centre row, centre col, key, half size [2]) of where ``key`` may reach this round."""
        centre, half = self._box(self._points(cells, trim=True))
        self.margin[key] = max(1.0, 2 * self.margin[key]) if key in self.margin else 0.0
        return float(centre[0]), float(centre[1]), key, 2 * self.half - half + self.margin[key]

    def _located(self, cells: list[torch.Tensor] | None) -> bool:
        return bool(cells) and len(self._points(cells)) > 0

    def _points(self, cells: list[torch.Tensor], trim: bool = False) -> torch.Tensor:
        """``[cells, 2]`` (row, col) of a key's known cells with a place, without far outliers when ``trim``."""
        points = self.places[torch.cat(cells)]
        points = points[points.isfinite().all(1)]
        if trim:
            points = points[((points - points.median(0).values).abs() <= self.outlier).all(1)]
        return points

    @staticmethod
    def _box(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre ``[2]`` and half size ``[2]`` of the box around ``points`` ``[n, 2]``."""
        low, high = points.amin(0), points.amax(0)
        return (low + high) / 2, (high - low) / 2

    @staticmethod
    def _colouring(regions: list[tuple[float, float, int, torch.Tensor]]) -> list[list[int]]:
        """Greedy colouring in raster order of the regions' centres: groups of keys whose regions do not meet."""
        if not regions:
            return []
        regions = sorted(regions, key=lambda region: region[:3])
        centres = torch.tensor([region[:2] for region in regions], dtype=torch.float64)
        reach = torch.stack([region[3] for region in regions])                # [keys, 2]
        colours = torch.full((len(regions),), -1, dtype=torch.long)
        for i in range(len(regions)):
            apart = ((centres[:i] - centres[i]).abs() > reach[:i] + reach[i]).any(1)
            taken = colours[:i][~apart]
            free = torch.ones(len(taken) + 1, dtype=torch.bool)
            free[taken[taken <= len(taken)]] = False
            colours[i] = int(free.nonzero()[0])
        groups: list[list[int]] = [[] for _ in range(int(colours.max()) + 1)]
        for region, colour in zip(regions, colours.tolist()):
            groups[colour].append(region[2])
        return groups
