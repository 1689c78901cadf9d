"""A constraint set compiled against one request: feasibility, look-ahead masks, violations.

Algorithm
---------
**Signatures.** Two candidates are interchangeable for every constraint when they agree on the
attributes the set reads, so the search runs over *classes* of candidates with one signature
``(category key, creator key, cold-start flag, long-tail flag, required id)``, each class with a
count of usable items, instead of over items. Keys are coarsened to what can matter: a category
(creator) keeps its own key only if a quota names it, or a spacing rule applies to it and it has
2+ usable candidates (a single item cannot be too close to another), or (creators) the cap
``max_per_creator`` is below its number of usable candidates; every other value becomes one
"free" key that no rule reads. A flag counts only if a quota reads it; each required item is its
own class. With a few quotas and no spacing / cap there are a handful of classes whatever n.

**State.** Positions are filled left to right. After a prefix of t items the future depends only
on: the remaining count of each class, the quota counts inside their windows (``within``), the
items per capped creator, the required items still missing, and the classes of the last
``d_max - 1`` positions (spacing). Counts follow from the multiset of classes used, so a state
is keyed by ``(remaining counts, last classes)``.

**Search.** :meth:`RequestConstraints._search` is a depth-first search over states that returns
a completion (a witness) or proves there is none. The classes that may stand at position t
(an item left, creator cap, quota maxima inside their window, spacing against the last
positions) are tried most urgent first (quota minima with little slack, required items, keys
with many items left for spacing, quota maxima with little room last), so a feasible state
usually costs one descent. Every state is first checked against necessary conditions
(``_check_state``), which is what keeps infeasible branches shallow:

- required items: they fit in the positions left, under their creators' caps, apart enough
  for spacing, and past a quota maximum's window where its room is too small;
- capacity: items left under the creator caps, and under each spacing rule (a key appears at
  most ceil(P / d) times in P positions, later if it was just shown), alone and beside a
  whole-list quota maximum, cover the positions left;
- each quota minimum: its deficit fits the positions left in its window and its supply of
  matching items (under the caps, under every quota maximum whose window holds its window,
  and under spacing);
- each quota maximum: enough non-matching items (under the caps) fill the rest of its window;
- minima together: a Hall bound over quotas on distinct values of one attribute, and an exact
  cover bound (the fewest items that meet all deficits due by each window end, an item
  counting once for every quota it matches; breadth-first over deficit vectors, cached).

Failed states are remembered, feasible ones with their witness, so no state is expanded twice:
the search is exact, and its worst case is the number of reachable states, at most
``prod_s (size_s + 1) * S^(d_max - 1)`` for ``S`` classes (exponential in general: quotas on
several overlapping attributes with spacing are a scheduling problem), each check
``O(S (Q + R + G))`` numpy work for ``Q`` quotas, ``R`` spacing rules and ``G`` capped
creators. In practice the bounds cut infeasible branches at once: over 16,000 random requests
(n <= 30, m <= 10) the largest search took about 1,200 states. A node budget (``max_nodes``)
bounds a pathological request: past it :class:`ConstraintSearchLimit` is raised instead of
searching on.

**Look-ahead.** ``allowed(prefix)`` returns the candidates whose class leads to a feasible
state. The same conditions, vectorised over all classes, drop most impossible children at
once; a witness ``W`` of the prefix's state then accepts most of the rest without a search, by
rewrites checked exactly and vectorised over classes and positions: ``s`` first and ``W[j]``
dropped (for every j), or ``s`` moved from inside ``W`` to the front. Only the classes no
rewrite accepts get a search of their own (which stores the child's witness for the next step;
a new witness is tried on the classes still open). A decoder that always picks an allowed
candidate therefore always has one to pick, and ends with a list that satisfies every
constraint.

Measured (CPU time per ``allowed`` call on a busy 2-core machine, random requests, constrained
greedy walks): n = 60, m = 6 with a creator cap, a windowed cold-start minimum and a category
maximum, 0.5-0.8 ms (compile + feasibility 2-3 ms per request); with five kinds at once (three
quotas, cap 1, a required and a forbidden id, spacing) 3-6 ms. n = 500, m = 50: about 1 ms
and 35 ms per call for the same two sets (feasibility 11 and 33 ms per request).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from genrerank.constraints.spec import ConstraintSet

__all__ = [
    "DEFAULT_MAX_NODES",
    "ConstraintSearchLimit",
    "InfeasibleConstraints",
    "RequestConstraints",
    "compile_constraints",
]

#: Search nodes one request may expand before :class:`ConstraintSearchLimit` (a few seconds).
DEFAULT_MAX_NODES = 200_000
_FREE = -1  # key of a value no rule reads (attribute values are indices >= 0)
_BIG = 1 << 40  # "no maximum"
_COVER_STATES = 20_000  # deficit vectors the exact cover bound may visit
Q_BITS = 60  # the cover bound packs quotas into int64 bitmasks (more quotas: it is skipped)


class InfeasibleConstraints(ValueError):
    """No list of the request's length satisfies the constraints. ``conflict`` names the
    constraints that cannot hold together (a minimal such subset)."""

    def __init__(self, message: str, conflict: Sequence[str] = (),
                 request_id: str | None = None) -> None:
        self.conflict = tuple(conflict)
        self.request_id = request_id
        super().__init__(message)


class ConstraintSearchLimit(ValueError):
    """The feasibility search used its node budget without an answer."""


def _array(x: Any, dtype: Any, n: int | None, name: str) -> np.ndarray | None:
    if x is None:
        return None
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x).astype(dtype, copy=False).reshape(-1)
    if n is not None and arr.shape[0] != n:
        raise ValueError(f"compile_constraints: {name} has {arr.shape[0]} entries for {n} "
                         "candidates")
    return arr


def compile_constraints(
    cs: ConstraintSet, *, category: Any = None, creator: Any = None, is_cold_start: Any = None,
    is_long_tail: Any = None, item_ids: Sequence[str] | None = None,
    candidate_mask: Any = None, list_length: int, request_id: str | None = None,
    max_nodes: int = DEFAULT_MAX_NODES,
) -> RequestConstraints:
    """Compile ``cs`` for one request of ``n`` candidates.

    Attribute arrays are ``[n]`` (numpy, torch or lists); one the set does not read may be
    None. ``item_ids [n]`` is needed when the set has required / forbidden ids;
    ``candidate_mask [n]`` (None: all real) marks real candidates. The list is
    ``L = min(list_length, real candidates)`` long. Nothing is searched yet:
    :meth:`RequestConstraints.check_feasible` (the decoders call it) does that.
    """
    return RequestConstraints(cs, category=category, creator=creator,
                              is_cold_start=is_cold_start, is_long_tail=is_long_tail,
                              item_ids=item_ids, candidate_mask=candidate_mask,
                              list_length=list_length, request_id=request_id,
                              max_nodes=max_nodes)


class _State:
    """Search state after a prefix (see the module docstring); ``parent`` / ``via`` link a
    state reached by one more item to its parent, for witnesses derived by a rewrite."""

    __slots__ = ("gc", "key", "local", "missing", "ok", "parent", "qc", "rem", "t", "via",
                 "window")

    def __init__(self, t: int, rem: np.ndarray, qc: np.ndarray, gc: np.ndarray, missing: int,
                 window: tuple[int, ...], parent: _State | None = None, via: int = -1) -> None:
        self.t, self.rem, self.qc, self.gc = t, rem, qc, gc
        self.missing, self.window, self.parent, self.via = missing, window, parent, via
        self.key = (rem.tobytes(), window)
        self.ok: bool | None = None  # _state_ok, computed once
        self.local: np.ndarray | None = None  # _local_ok, computed once


class RequestConstraints:
    """A :class:`ConstraintSet` compiled for one request (build with
    :func:`compile_constraints`). Caches its searches: one object per request and length."""

    def __init__(self, cs: ConstraintSet, *, category: Any, creator: Any, is_cold_start: Any,
                 is_long_tail: Any, item_ids: Sequence[str] | None, candidate_mask: Any,
                 list_length: int, request_id: str | None = None,
                 max_nodes: int = DEFAULT_MAX_NODES) -> None:
        self.cs = cs
        self.request_id = request_id
        self.max_nodes = int(max_nodes)
        self._inputs = {"category": category, "creator": creator,
                        "is_cold_start": is_cold_start, "is_long_tail": is_long_tail,
                        "item_ids": item_ids, "candidate_mask": candidate_mask}
        n = None
        for x in (candidate_mask, category, creator, is_cold_start, is_long_tail, item_ids):
            if x is not None:
                n = len(x) if not hasattr(x, "shape") else int(np.prod(x.shape))
                break
        if n is None:
            raise ValueError("compile_constraints: give candidate_mask or an attribute array")
        self.n = n
        mask = _array(candidate_mask, np.bool_, n, "candidate_mask")
        self.real = np.ones(n, np.bool_) if mask is None else mask.copy()
        if int(list_length) != list_length or list_length < 0:
            raise ValueError(f"compile_constraints: list_length must be an int >= 0, got "
                             f"{list_length}")
        self.requested_length = int(list_length)
        self.list_length = min(int(list_length), int(self.real.sum()))
        needed = cs.attributes()
        arrays = {
            "category": _array(category, np.int64, n, "category"),
            "creator": _array(creator, np.int64, n, "creator"),
            "cold_start": _array(is_cold_start, np.bool_, n, "is_cold_start"),
            "long_tail": _array(is_long_tail, np.bool_, n, "is_long_tail"),
        }
        for name in needed:
            if arrays[name] is None:
                raise ValueError(f"compile_constraints: the constraints read each candidate's "
                                 f"{name}, which was not given")
        self.category = arrays["category"]
        self.creator = arrays["creator"]
        self.cold = arrays["cold_start"]
        self.tail = arrays["long_tail"]
        if (cs.required or cs.forbidden) and item_ids is None:
            raise ValueError("compile_constraints: required / forbidden ids need the "
                             "candidates' item_ids")
        self.item_ids = None if item_ids is None else [str(i) for i in item_ids]
        if self.item_ids is not None and len(self.item_ids) != n:
            raise ValueError(f"compile_constraints: item_ids has {len(self.item_ids)} entries "
                             f"for {n} candidates")
        self._compile()
        self._witness: dict[Any, tuple[int, ...]] = {}
        self._dead: set[Any] = set()
        self._allowed_cache: dict[Any, np.ndarray] = {}
        self._variants: dict[Any, tuple[tuple[int, ...], dict[int, tuple[int, ...]]]] = {}
        self._states: dict[tuple[int, ...], _State | None] = {}
        self._cover_cache: dict[Any, int] = {}
        self._nodes = 0
        self._feasible: bool | None = None

    # ------------------------------------------------------------------ compilation

    def _compile(self) -> None:
        cs, n, L = self.cs, self.n, self.list_length
        self.problems: list[tuple[str, str]] = []  # (constraint label, why) found statically
        index: dict[str, int] = {}
        if self.item_ids is not None:
            for i, item in enumerate(self.item_ids):
                if self.real[i]:
                    index.setdefault(item, i)
        banned = set(cs.forbidden)
        self.forbidden_idx = np.array(
            [] if self.item_ids is None or not banned else
            [i for i, item in enumerate(self.item_ids) if self.real[i] and item in banned],
            dtype=np.int64)
        usable = self.real.copy()
        usable[self.forbidden_idx] = False
        self.usable = usable
        forbidden = set(cs.forbidden)
        self.required_idx: list[int] = []
        for j, item in enumerate(cs.required):
            label = f"required[{j}] ({item!r})"
            if item in forbidden:
                self.problems.append((label, f"{item!r} is also forbidden"))
            elif item not in index:
                self.problems.append((label, f"{item!r} is not among the request's candidates"))
            elif index[item] not in self.required_idx:
                self.required_idx.append(index[item])
        if len(self.required_idx) > L:
            self.problems.append(("required", f"{len(self.required_idx)} required items do "
                                              f"not fit in a list of {L}"))
        required_pos = np.full(n, -1, np.int64)
        for j, i in enumerate(self.required_idx):
            required_pos[i] = j
        # Active quotas only (a bound-free quota constrains nothing).
        self.quota_ids = [i for i, q in enumerate(cs.quotas) if q.min or q.max is not None]
        quotas = [cs.quotas[i] for i in self.quota_ids]
        self.spacing_ids = [i for i, s in enumerate(cs.spacing) if s.distance > 1]
        spacing = [cs.spacing[i] for i in self.spacing_ids]
        cap = cs.max_per_creator
        self.cap = cap
        self.trivial = not quotas and not spacing and cap is None and not self.required_idx
        self.usable_idx = np.flatnonzero(usable)
        u = self.usable_idx

        def keys(values: np.ndarray | None, attr: str) -> np.ndarray:
            if values is None:
                return np.full(len(u), _FREE, np.int64)
            vals = values[u]
            named = {q.value for q in quotas if q.attribute == attr}
            keep = set(named)
            uniq, counts = np.unique(vals, return_counts=True)
            if any(s.attribute == attr for s in spacing):
                keep |= set(uniq[counts >= 2].tolist())
            if attr == "creator" and cap is not None:
                keep |= set(uniq[counts > cap].tolist())
            if not keep:
                return np.full(len(u), _FREE, np.int64)
            return np.where(np.isin(vals, np.fromiter(keep, np.int64)), vals, _FREE)

        cat_key = keys(self.category, "category")
        cre_key = keys(self.creator, "creator")
        cold = (self.cold[u] if self.cold is not None and any(
            q.attribute == "cold_start" for q in quotas) else np.zeros(len(u), np.bool_))
        tail = (self.tail[u] if self.tail is not None and any(
            q.attribute == "long_tail" for q in quotas) else np.zeros(len(u), np.bool_))
        sig = np.stack([cat_key, cre_key, cold.astype(np.int64), tail.astype(np.int64),
                        required_pos[u]], axis=1) if len(u) else np.zeros((0, 5), np.int64)
        classes, cls_of = np.unique(sig, axis=0, return_inverse=True)
        self.cls_of_usable = cls_of.reshape(-1).astype(np.int64)
        self.item_class = np.full(n, -1, np.int64)
        self.item_class[u] = self.cls_of_usable
        S = len(classes)
        self.S = S
        self.size = np.bincount(self.cls_of_usable, minlength=S).astype(np.int64)
        c_cat, c_cre = classes[:, 0], classes[:, 1]
        self.is_req = classes[:, 4] >= 0 if S else np.zeros(0, np.bool_)
        # Quotas: match matrix [Q, S], windows K, bounds.
        Q = len(quotas)
        self.Q = Q
        match = np.zeros((Q, S), np.bool_)
        for k, q in enumerate(quotas):
            if q.attribute == "category":
                match[k] = c_cat == q.value
            elif q.attribute == "creator":
                match[k] = c_cre == q.value
            elif q.attribute == "cold_start":
                match[k] = classes[:, 2] == 1
            else:
                match[k] = classes[:, 3] == 1
        self.qmatch = match
        self.qmatch_i = match.astype(np.int64)
        self.qK = np.array([L if q.within is None else min(q.within, L) for q in quotas],
                           np.int64)
        self.qmin = np.array([q.min for q in quotas], np.int64)
        self.qmax = np.array([_BIG if q.max is None else q.max for q in quotas], np.int64)
        self.has_max = np.array([q.max is not None for q in quotas], np.bool_)
        # Hall groups: minimum quotas on distinct values of one indexed attribute.
        self.hall: list[tuple[int, np.ndarray, np.ndarray]] = []
        for attr in ("category", "creator"):
            ids = [k for k, q in enumerate(quotas) if q.attribute == attr and q.min > 0]
            if len({quotas[k].value for k in ids}) < 2:
                continue
            for kt in sorted({int(self.qK[k]) for k in ids}):
                sel = sorted((k for k in ids if self.qK[k] <= kt), key=lambda k: quotas[k].value)
                vals = [quotas[k].value for k in sel]
                starts = [i for i in range(len(sel)) if i == 0 or vals[i] != vals[i - 1]]
                if len(starts) >= 2:
                    self.hall.append((kt, np.array(sel, np.int64), np.array(starts, np.int64)))
        # Creator caps: groups of classes sharing a capped creator.
        capped: list[int] = []
        if cap is not None and S:
            uniq, counts = np.unique(self.creator[u], return_counts=True)
            capped = sorted(set(uniq[counts > cap].tolist()))
        self.G = len(capped)
        gidx = {c: g for g, c in enumerate(capped)}
        self.group = np.array([gidx.get(int(c), -1) for c in c_cre], np.int64)
        self.onehot = np.zeros((S, self.G), np.int64)
        has_group = self.group >= 0
        self.onehot[np.flatnonzero(has_group), self.group[has_group]] = 1
        # Minimum quotas each class counts for (bit k: quota k), for the cover bound.
        self.bit_values = np.array([1 << k for k in range(Q)], dtype=object)
        self.qbits = np.zeros(S, np.int64)
        for k in range(min(Q, Q_BITS)):
            if self.qmin[k] > 0:
                self.qbits |= match[k].astype(np.int64) << k
        # (minimum quota q, maximum quota q2 whose window holds q's): q's items beyond q2's
        # room must come from items outside q2.
        self.pairs: list[tuple[int, int, np.ndarray]] = [
            (q, q2, (match[q] & ~match[q2]).astype(np.int64))
            for q in range(Q) for q2 in range(Q)
            if self.qmin[q] > 0 and self.has_max[q2] and q != q2
            and self.qK[q2] >= self.qK[q] and (match[q] & match[q2]).any()]
        # Spacing: per rule the classes' keys and the distance.
        self.spk = np.array([c_cat if s.attribute == "category" else c_cre for s in spacing],
                            np.int64).reshape(len(spacing), S)
        self.spd = np.array([s.distance for s in spacing], np.int64)
        self.window_len = int(self.spd.max()) - 1 if len(spacing) else 0
        # Per rule: each class's key as an index (the free key last), one-hot [S, keys].
        self.keyhot: list[np.ndarray] = []
        self.kidx: list[np.ndarray] = []
        for k in range(len(spacing)):
            values = sorted(set(self.spk[k].tolist()) - {_FREE})
            where = {v: j for j, v in enumerate(values)}
            idx = np.array([where.get(v, len(values)) for v in self.spk[k].tolist()], np.int64)
            hot = np.zeros((S, len(values) + 1), np.int64)
            hot[np.arange(S), idx] = 1
            self.keyhot.append(hot[:, :-1])
            self.kidx.append(idx)
        self.n_required = len(self.required_idx)

    # ------------------------------------------------------------------ states

    def _root(self) -> _State:
        return _State(0, self.size.copy(), np.zeros(self.Q, np.int64), np.zeros(self.G, np.int64),
                      self.n_required, ())

    def _local_ok(self, st: _State) -> np.ndarray:
        """bool [S]: classes that may stand at position ``st.t`` (before look-ahead)."""
        if st.local is not None:
            return st.local
        ok = st.rem > 0
        if self.G:
            ok &= np.append(st.gc, -1)[self.group] < self.cap
        if self.Q:
            full = (st.t < self.qK) & (st.qc >= self.qmax)
            if full.any():
                ok &= ~self.qmatch[full].any(0)
        for r in range(len(self.spd)):
            recent = st.window[len(st.window) - int(self.spd[r]) + 1:]
            if recent:
                ok &= ~self._near_table(r, recent)[self.kidx[r]]
        st.local = ok
        return ok

    def _near_table(self, r: int, classes: Sequence[int]) -> np.ndarray:
        """bool [keys + 1]: the keys of ``classes`` under rule r (the free key never)."""
        table = np.zeros(self.keyhot[r].shape[1] + 1, np.bool_)
        table[self.kidx[r][list(classes)]] = True
        table[-1] = False
        return table

    def _state_ok(self, st: _State) -> bool:
        """Necessary conditions for a state to have a completion (see the module docstring);
        checked once per expanded state, the cheaper per-child filter in ``_children``."""
        if st.ok is None:
            st.ok = self._check_state(st)
        return st.ok

    def _check_state(self, st: _State) -> bool:
        L, t = self.list_length, st.t
        if st.missing > L - t or self._capacity(st) < L - t:
            return False
        if st.missing and not self._required_ok(st):
            return False
        if len(self.spd):
            # Every position is filled and a key appears at most ceil(P / d) times in P
            # positions (and not within d of its last appearance in the prefix).
            r = self._usable_rem(st)
            for k in range(len(self.spd)):
                d, left = int(self.spd[k]), L - t
                per_key = r @ self.keyhot[k]
                limit = np.full(per_key.size, (left + d - 1) // d)
                for back, c in enumerate(reversed(st.window[len(st.window) - d + 1:])):
                    j = self.kidx[k][c]
                    if j < per_key.size:  # its next use is at t + d - 1 - back at the soonest
                        limit[j] = min(limit[j], (max(left - (d - 1 - back), 0) + d - 1) // d)
                is_free = self.kidx[k] == per_key.size
                if int(r[is_free].sum()) + int(np.minimum(per_key, limit).sum()) < left:
                    return False
                # A whole-list quota maximum leaves the rest to items outside it.
                rows = np.flatnonzero(self.has_max & (self.qK == L)) if self.Q else ()
                if len(rows):
                    other = (1 - self.qmatch_i[rows]) * r  # [rows, S]
                    have = other[:, is_free].sum(1) + np.minimum(
                        other @ self.keyhot[k], limit[None, :]).sum(1)
                    if (have + self.qmax[rows] - st.qc[rows] < left).any():
                        return False
        if not self.Q:
            return True
        if (st.qc > self.qmax).any():
            return False
        deficit = self.qmin - st.qc
        if (deficit > np.maximum(self.qK - t, 0)).any():
            return False
        r = self._usable_rem(st)
        open_max = self.has_max & (t < self.qK)
        if open_max.any():
            # The window's other positions need non-matching items, under the creator caps.
            rows = np.flatnonzero(open_max)
            need = (self.qK[rows] - t) - (self.qmax[rows] - st.qc[rows])
            other = (1 - self.qmatch_i[rows]) * r  # [rows, S]
            if self.G:
                per_group = other @ self.onehot
                have = other[:, self.group < 0].sum(1) + np.minimum(
                    per_group, self.cap - st.gc).sum(1)
            else:
                have = other.sum(1)
            if (need > have).any():
                return False
        open_min = (deficit > 0) & (t < self.qK)
        if not open_min.any():
            return True
        rows = np.flatnonzero(open_min)
        if (deficit[rows] > self._supply(st, r, rows)).any():
            return False
        for kt, sel, starts in self.hall:
            d = np.maximum(deficit[sel], 0)
            if int(np.maximum.reduceat(d, starts).sum()) > max(kt - t, 0):
                return False
        return Q_BITS < self.Q or self._cover_ok(st, deficit, open_min, r)

    def _required_ok(self, st: _State) -> bool:
        """The missing required items fit: under their creators' caps, apart enough for each
        spacing rule, and beyond a quota maximum's window where its room is too small."""
        L, t = self.list_length, st.t
        req = self.is_req & (st.rem > 0)
        if self.G:
            g = self.group[req]
            g = g[g >= 0]
            if g.size and (np.bincount(g, minlength=self.G) > self.cap - st.gc).any():
                return False
        for r in range(len(self.spd)):
            if self.keyhot[r].shape[1]:
                most = int((req.astype(np.int64) @ self.keyhot[r]).max())
                if (most - 1) * int(self.spd[r]) + 1 > L - t:
                    return False
        if self.Q:
            open_max = self.has_max & (t < self.qK)
            if open_max.any():
                excess = self.qmatch_i @ req.astype(np.int64) - (self.qmax - st.qc)
                if (excess[open_max] > (L - self.qK)[open_max]).any():
                    return False
        return True

    def _usable_rem(self, st: _State) -> np.ndarray:
        """Remaining items per class, 0 for classes whose creator has reached the cap."""
        if not self.G:
            return st.rem
        full = np.append(st.gc >= self.cap, False)
        return np.where(full[self.group], 0, st.rem)

    def _supply(self, st: _State, r: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Upper bounds on the items quotas ``rows`` can still get: their matching items
        under the creator caps, under every quota maximum whose window holds theirs, and at
        most ceil(P / d) items of one key in P positions under a spacing rule."""
        mr = self.qmatch_i[rows] * r
        if self.G:
            per_group = mr @ self.onehot  # [rows, G]
            sup = mr[:, self.group < 0].sum(1) + np.minimum(per_group, self.cap - st.gc).sum(1)
        else:
            sup = mr.sum(1)
        if self.pairs:
            where = {int(q): i for i, q in enumerate(rows)}
            for q, q2, only in self.pairs:
                if q in where and st.t < self.qK[q2]:
                    i = where[q]
                    sup[i] = min(sup[i], int(only @ r) + int(self.qmax[q2] - st.qc[q2]))
        slots = np.maximum(self.qK[rows] - st.t, 0)
        for k in range(len(self.spd)):
            d = int(self.spd[k])
            per_key = mr @ self.keyhot[k]  # [rows, keys]
            free = mr[:, self.kidx[k] == self.keyhot[k].shape[1]].sum(1)
            sup = np.minimum(sup, free + np.minimum(per_key, ((slots + d - 1) // d)[:, None]
                                                    ).sum(1))
        return sup

    def _cover_ok(self, st: _State, deficit: np.ndarray, open_: np.ndarray,
                  r: np.ndarray) -> bool:
        """The quota minima (and required items) that must be met by one window's end need
        enough items together, not only one by one: an item counts once for each quota it
        matches. ``_min_cover`` gives the fewest items that cover the deficits."""
        avail = r > 0
        missing_req = avail & self.is_req
        bits_all = np.unique(self.qbits[avail])
        bits_plain = np.unique(self.qbits[avail & ~self.is_req]) if missing_req.any() \
            else bits_all
        return self._cover_fits(st.t, np.where(open_, deficit, 0),
                                self.qbits[missing_req].tolist(), bits_all, bits_plain)

    def _cover_fits(self, t: int, d_all: np.ndarray, req_bits: list[int],
                    bits_all: np.ndarray, bits_plain: np.ndarray) -> bool:
        """``_cover_ok`` for deficits ``d_all`` (0 where a quota is met or closed) at
        position t, the missing required items' quota bits and the bits of the classes left
        (all / not required)."""
        L = self.list_length
        open_ = d_all > 0
        for kt in sorted(set(self.qK[open_].tolist())):
            in_window = open_ & (self.qK <= kt)
            mask = int(np.dot(in_window, self.bit_values))
            d = tuple(int(x) for x in np.where(in_window, d_all, 0))
            if kt < L or not req_bits:
                pats = frozenset(int(b) & mask for b in bits_all) - {0}
                if self._min_cover(d, pats) > kt - t:
                    return False
            else:  # the required items come on top, covering what they match at best
                left = list(d)
                for b in req_bits:
                    for k in range(len(left)):
                        if (b >> k) & 1 and left[k]:
                            left[k] -= 1
                pats = frozenset(int(b) & mask for b in bits_plain) - {0}
                if len(req_bits) + self._min_cover(tuple(left), pats) > kt - t:
                    return False
        return True

    def _min_cover(self, d: tuple[int, ...], pats: frozenset[int]) -> int:
        """Fewest items (patterns = bitmasks of matched quotas, repeats allowed) that bring
        every deficit of ``d`` to 0, by breadth-first search over deficit vectors; a lower
        bound (the largest deficit) when that space is too large. Cached."""
        if not any(d):
            return 0
        key = (d, pats)
        hit = self._cover_cache.get(key)
        if hit is not None:
            return hit
        # Only maximal patterns matter: a superset covers at least as much.
        useful = [p for p in pats if not any(p != o and p & o == p for o in pats)]
        space = 1
        for x in d:
            space *= x + 1
        union = 0
        for p in useful:
            union |= p
        if not useful or any(x and not (union >> k) & 1 for k, x in enumerate(d)):
            best = _BIG
        elif sum(p.bit_count() for p in useful) == union.bit_count():
            # Disjoint patterns (e.g. quotas on distinct categories, a skeleton's plan): each
            # pattern is needed as often as its largest deficit, and that many suffice.
            best = sum(max(x for k, x in enumerate(d) if (p >> k) & 1) for p in useful)
        elif space > _COVER_STATES:
            best = max(d)
        else:
            best, frontier, seen, level = _BIG, {d}, {d}, 0
            while frontier and best == _BIG:
                level += 1
                nxt = set()
                for v in frontier:
                    for p in useful:
                        w = tuple(x - 1 if x and (p >> k) & 1 else x for k, x in enumerate(v))
                        if not any(w):
                            best = level
                            break
                        if w not in seen:
                            seen.add(w)
                            nxt.add(w)
                    if best != _BIG:
                        break
                frontier = nxt
        self._cover_cache[key] = best
        return best

    def _capacity(self, st: _State) -> int:
        """Items left under the creator caps."""
        if not self.G:
            return int(st.rem.sum())
        free = int(st.rem[self.group < 0].sum())
        per_group = np.bincount(self.group[self.group >= 0], weights=st.rem[self.group >= 0],
                                minlength=self.G).astype(np.int64)
        return free + int(np.minimum(per_group, self.cap - st.gc).sum())

    def _children(self, st: _State) -> np.ndarray:
        """Classes that may come next and pass the look-ahead conditions (vectorised over
        classes; what ``allowed`` starts from)."""
        L, t = self.list_length, st.t
        if t >= L or not self._state_ok(st):
            return np.zeros(0, np.int64)
        cand = np.flatnonzero(self._local_ok(st))
        if cand.size == 0:
            return cand
        t1 = t + 1
        keep = st.missing - self.is_req[cand] <= L - t1
        if self.Q:
            act = (t < self.qK).astype(np.int64)
            m = self.qmatch_i[:, cand]  # [Q, C]
            qc1 = st.qc[:, None] + m * act[:, None]
            deficit = self.qmin[:, None] - qc1
            avail = self.qmatch_i @ st.rem  # matching items left
            keep &= (deficit <= np.minimum(np.maximum(self.qK - t1, 0)[:, None],
                                           avail[:, None] - m)).all(0)
            open_max = self.has_max & (t1 < self.qK)
            if open_max.any():
                need = (self.qK[open_max] - t1)[:, None] - (self.qmax[open_max][:, None]
                                                              - qc1[open_max])
                other = (int(st.rem.sum()) - avail[open_max])[:, None] - (1 - m[open_max])
                keep &= (need <= other).all(0)
            for kt, sel, starts in self.hall:
                d = np.maximum(deficit[sel], 0)
                keep &= np.maximum.reduceat(d, starts, axis=0).sum(0) <= max(kt - t1, 0)
            if self.Q <= Q_BITS:
                keep &= self._children_cover(st, cand, keep)
        if self.G and st.missing:
            # A missing required item keeps room under its creator's cap.
            req = self.is_req & (st.rem > 0)
            g = self.group[req]
            held = np.append(st.gc + np.bincount(g[g >= 0], minlength=self.G), 0)
            gs = self.group[cand]
            keep &= ~((gs >= 0) & ~self.is_req[cand] & (held[gs] + 1 > self.cap))
        return cand[keep]

    def _order(self, st: _State) -> np.ndarray:
        """The classes that may stand at position t, most urgent first: tight quota minima,
        required items, then keys with many items left (for spacing); quota maxima with
        little room last."""
        L, t = self.list_length, st.t
        cand = np.flatnonzero(self._local_ok(st))
        if st.missing >= L - t:  # only required items fit now
            cand = cand[self.is_req[cand]]
        if cand.size <= 1:
            return cand
        score = np.zeros(cand.size)
        if self.Q:
            m = self.qmatch_i[:, cand]
            d0 = self.qmin - st.qc
            urgent = (d0 > 0) & (t < self.qK)
            if urgent.any():
                score += (1.0 / (1.0 + (self.qK - t - d0)[urgent])) @ m[urgent]
            tight = self.has_max & (t < self.qK)
            if tight.any():
                score -= (0.5 / (1.0 + (self.qmax - st.qc)[tight])) @ m[tight]
        if self.n_required:
            score += self.is_req[cand] * (1.0 / (1.0 + (L - t - st.missing)))
        for r in range(len(self.spd)):
            # Most items left under the same key first (optimal for one cooldown rule).
            per_key = np.append(st.rem @ self.keyhot[r], 0)
            score += per_key[self.kidx[r][cand]] / max(L - t, 1)
        return cand[np.argsort(-score, kind="stable")]

    def _children_cover(self, st: _State, cand: np.ndarray, keep: np.ndarray) -> np.ndarray:
        """bool [C]: the cover bound (``_cover_ok``) for each child, one evaluation per
        distinct (quota bits, required) among them; the classes left are the parent's (a
        relaxation: the child uses one item)."""
        t, t1 = st.t, st.t + 1
        deficit = self.qmin - st.qc
        open_ = (deficit > 0) & (t < self.qK)
        out = np.ones(cand.size, np.bool_)
        if not open_.any():
            return out
        r = self._usable_rem(st)
        avail = r > 0
        missing_req = avail & self.is_req
        req_cls = np.flatnonzero(missing_req).tolist()
        bits_all = np.unique(self.qbits[avail])
        bits_plain = np.unique(self.qbits[avail & ~self.is_req]) if req_cls else bits_all
        act = t < self.qK
        codes = self.qbits[cand] * 2 + self.is_req[cand]
        for code in np.unique(codes[keep]).tolist():
            bits, is_req = code >> 1, code & 1
            hit = np.array([(bits >> k) & 1 for k in range(self.Q)], np.int64) * act
            d = np.where(open_ & (t1 < self.qK), np.maximum(deficit - hit, 0), 0)
            if is_req:  # the child is one of the missing required items: drop one such entry
                same = [c for c in req_cls if int(self.qbits[c]) == bits]
                rest = [int(self.qbits[c]) for c in req_cls if c != same[0]]
            else:
                rest = [int(self.qbits[c]) for c in req_cls]
            if not self._cover_fits(t1, d, rest, bits_all, bits_plain):
                out[codes == code] = False
        return out

    def _child(self, st: _State, s: int) -> _State:
        rem = st.rem.copy()
        rem[s] -= 1
        qc = st.qc
        if self.Q:
            qc = qc + self.qmatch_i[:, s] * (st.t < self.qK)
        gc = st.gc
        g = int(self.group[s]) if self.G else -1
        if g >= 0:
            gc = gc.copy()
            gc[g] += 1
        window = (st.window + (s,))[-self.window_len:] if self.window_len else ()
        return _State(st.t + 1, rem, qc, gc, st.missing - int(self.is_req[s]), window, st, s)

    # ------------------------------------------------------------------ search

    def _search(self, st: _State) -> tuple[int, ...] | None:
        """A completion of ``st`` (classes for positions t..L-1), or None if none exists."""
        if st.t >= self.list_length:
            return ()
        key = st.key
        found = self._witness.get(key)
        if found is not None:
            return found
        if key in self._dead:
            return None
        derived = self._derived_witness(st)
        if derived is not None:
            self._witness[key] = derived
            return derived
        self._nodes += 1
        if self._nodes > self.max_nodes:
            who = f" for request {self.request_id!r}" if self.request_id is not None else ""
            raise ConstraintSearchLimit(
                f"constraints{who}: undecided after {self.max_nodes} search steps; simplify "
                "the constraints")
        if self._state_ok(st):
            # Children in urgency order, each checked only when its turn comes: the first
            # one usually completes, so most of them are never looked at.
            for s in self._order(st).tolist():
                child = self._child(st, s)
                if not self._state_ok(child):
                    continue
                rest = self._search(child)
                if rest is not None:
                    w = (s, *rest)
                    self._witness[key] = w
                    return w
        self._dead.add(key)
        return None

    def _derived_witness(self, st: _State) -> tuple[int, ...] | None:
        """The witness a rewrite accepted for ``st`` from its parent's (see ``allowed``)."""
        if st.parent is None:
            return None
        info = self._variants.get(st.parent.key)
        if info is None:
            return None
        return info[1].get(st.via)

    def _valid_completion(self, st: _State, seq: Sequence[int]) -> bool:
        """Exact check that classes ``seq`` complete ``st`` to a list satisfying everything."""
        if len(seq) != self.list_length - st.t:
            return False
        cur = st
        for s in seq:
            if not self._local_ok_one(cur, s):
                return False
            cur = self._child(cur, s)
        return cur.missing == 0 and bool((cur.qc >= self.qmin).all())

    def _local_ok_one(self, st: _State, s: int) -> bool:
        if st.rem[s] <= 0:
            return False
        if self.G and self.group[s] >= 0 and st.gc[self.group[s]] >= self.cap:
            return False
        if self.Q and ((st.t < self.qK) & self.qmatch[:, s] & (st.qc >= self.qmax)).any():
            return False
        for r in range(len(self.spd)):
            k = self.spk[r, s]
            if k == _FREE:
                continue
            recent = st.window[len(st.window) - int(self.spd[r]) + 1:] if st.window else ()
            if any(self.spk[r, c] == k for c in recent):
                return False
        return True

    # ------------------------------------------------------------------ public API

    def is_empty(self) -> bool:
        """True when nothing but the plain rules (real, distinct) limits the list."""
        return self.trivial and not self.forbidden_idx.size

    def ids_only(self) -> bool:
        """True when only required / forbidden ids constrain the list (no quota, cap or
        spacing): then any order of an allowed set of items is valid."""
        return not self.quota_ids and not self.spacing_ids and self.cap is None

    def for_length(self, list_length: int) -> RequestConstraints:
        """This request's constraints for another list length (self when it is the same)."""
        if min(int(list_length), int(self.real.sum())) == self.list_length:
            return self
        return RequestConstraints(self.cs, **self._inputs, list_length=list_length,
                                  request_id=self.request_id, max_nodes=self.max_nodes)

    def check_feasible(self) -> None:
        """Raise :class:`InfeasibleConstraints` unless some list of length L satisfies every
        constraint; the message names a minimal set of constraints that conflict."""
        if self.feasible():
            return
        raise self._explain()

    def _root_ok(self) -> bool:
        return not self.problems and self._state_ok(self._root())

    def feasible(self) -> bool:
        """Whether some list satisfies every constraint, without naming the conflict (which
        costs a search per subset of the constraints: :meth:`check_feasible` does it)."""
        if self._feasible is None:
            self._feasible = self._root_ok() and self._search(self._root()) is not None
        return self._feasible

    def allowed(self, prefix: Sequence[int]) -> np.ndarray:
        """bool ``[n]``: the candidates that may come after ``prefix`` (candidate indices) and
        still leave a completion to length L that satisfies every constraint. All False when
        the prefix is complete, breaks a constraint or cannot be completed."""
        prefix = [int(i) for i in prefix]
        out = np.zeros(self.n, np.bool_)
        if len(prefix) >= self.list_length or self.problems:
            return out
        if self.trivial:  # only forbidden ids (or nothing): every unused usable item
            if self.usable.sum() < self.list_length:
                return out
            out[self.usable] = True
            if prefix:
                p = np.array(prefix)
                if (p < 0).any() or (p >= self.n).any() or len(set(prefix)) < len(prefix) \
                        or not self.usable[p].all():
                    return np.zeros(self.n, np.bool_)
                out[p] = False
            return out
        st = self._state_for(prefix)
        if st is None:
            return out
        ok = self._allowed_classes(st)
        out[self.usable_idx] = ok[self.cls_of_usable]
        if prefix:
            out[prefix] = False
        return out

    def _state_for(self, prefix: list[int]) -> _State | None:
        key = tuple(prefix)
        if key in self._states:
            return self._states[key]
        if not prefix:
            root = self._root()
            st: _State | None = root if self._root_ok() else None
        else:
            parent = self._state_for(prefix[:-1])
            i = prefix[-1]
            if not 0 <= i < self.n:
                raise ValueError(f"allowed: prefix item {i} is not a candidate index "
                                 f"(n = {self.n})")
            s = int(self.item_class[i])
            if parent is None or s < 0 or i in prefix[:-1] or not self._local_ok_one(parent, s):
                st = None
            else:
                st = self._child(parent, s)
                if not self._state_ok(st):
                    st = None
        self._states[key] = st
        return st

    def _allowed_classes(self, st: _State) -> np.ndarray:
        cached = self._allowed_cache.get(st.key)
        if cached is not None:
            return cached
        ok = np.zeros(self.S, np.bool_)
        w = self._search(st)
        if w is not None:
            accepted: dict[int, tuple[int, ...]] = {w[0]: w[1:]}
            todo = [int(s) for s in self._children(st) if s != w[0]]
            todo = self._rewrite(st, w, todo, accepted)
            while todo:
                s = todo.pop(0)
                rest = self._search(self._child(st, s))
                if rest is not None:
                    accepted[s] = rest
                    # A fresh witness starting with s may accept more classes by rewriting.
                    todo = self._rewrite(st, (s, *rest), todo, accepted)
            ok[list(accepted)] = True
            self._variants[st.key] = (w, accepted)
        self._allowed_cache[st.key] = ok
        return ok

    def _rewrite(self, st: _State, w: tuple[int, ...], todo: list[int],
                 accepted: dict[int, tuple[int, ...]]) -> list[int]:
        """Accept the classes of ``todo`` for which a rewrite of witness ``w`` is a valid
        completion starting with them (recording the rest of it); return the others.

        Rewrite j puts s first and drops ``w[j]``: ``(s, w[0..j-1], w[j+1..])``, so w's items
        before j move one position later and those after stay. Checked exactly for all j and
        all s at once, from what can change given that w was valid: s's own rules at t and
        against the items after it, the window counts, the creator totals, the required items
        (w[j] must not be one), and spacing across the gap (w[j-1] and w[j+1] get closer).
        Classes inside w are also tried moved to the front."""
        if not todo:
            return todo
        t, k = st.t, len(w)
        c = np.array(todo, np.int64)
        W = np.array(w, np.int64)
        js = [j for j in range(k) if not self.is_req[w[j]]]
        for r in range(len(self.spd)):
            d, key = int(self.spd[r]), self.spk[r, W]
            for a in range(k):
                for b in range(a + 2, min(a + d, k - 1) + 1):
                    if key[a] != _FREE and key[a] == key[b]:  # too close once a gap closes
                        js = [j for j in js if not a < j < b]
        ok = np.zeros((len(js), c.size), np.bool_)
        if js:
            J = np.array(js, np.int64)
            used = np.bincount(W, minlength=self.S)
            ok = st.rem[c][None, :] - used[c][None, :] + (W[J][:, None] == c[None, :]) >= 1
            ok &= self._local_ok(st)[c][None, :]
            if self.Q:
                mw = self.qmatch_i[:, W]  # [Q, k]
                shifted = mw * ((t + 1 + np.arange(k))[None, :] < self.qK[:, None])
                stay = mw * ((t + np.arange(k))[None, :] < self.qK[:, None])
                before = np.cumsum(shifted, 1) - shifted  # sum over i < j (moved)
                after = stay[:, ::-1].cumsum(1)[:, ::-1] - stay  # sum over i > j (in place)
                base = st.qc[:, None] + before[:, J] + after[:, J]  # [Q, J]
                new = base[:, :, None] + (self.qmatch_i[:, c] * (t < self.qK)[:, None])[:, None]
                ok &= ((new >= self.qmin[:, None, None])
                       & (new <= self.qmax[:, None, None])).all(0)
            if self.G:
                gw = self.group[W]
                total = st.gc + np.bincount(gw[gw >= 0], minlength=self.G)
                gs = self.group[c]
                has = gs >= 0
                if has.any():
                    room = total[gs[has]][None, :] - (gw[J][:, None] == gs[has][None, :]) + 1
                    ok[:, has] &= room <= self.cap
            for r in range(len(self.spd)):
                d = int(self.spd[r])
                # The d - 1 items after s: w[:d-1] for j >= d - 1, else w without w[j].
                far = self._near_table(r, w[: d - 1])[self.kidx[r][c]]
                for jj, j in enumerate(js):
                    if j >= d - 1:
                        ok[jj] &= ~far
                    else:
                        after_s = [x for i, x in enumerate(w[:d]) if i != j][: d - 1]
                        if after_s:
                            ok[jj] &= ~self._near_table(r, after_s)[self.kidx[r][c]]
        rest: list[int] = []
        first = ok.argmax(0) if js else None
        for i, s in enumerate(todo):
            if js and ok[first[i], i]:
                j = js[int(first[i])]
                accepted[s] = (*w[:j], *w[j + 1:])
            elif s in w:
                pos = w.index(s)
                seq = (s, *w[:pos], *w[pos + 1:])
                if self._valid_completion(st, seq):
                    accepted[s] = seq[1:]
                else:
                    rest.append(s)
            else:
                rest.append(s)
        return rest

    # ------------------------------------------------------------------ checking lists

    def violations(self, items: Sequence[int]) -> list[str]:
        """What ``items`` (candidate indices in display order; trailing -1 ignored) breaks:
        empty when it is a list of L distinct real candidates satisfying every constraint.
        Reads the raw attributes, not the compiled classes."""
        items = [int(i) for i in items]
        while items and items[-1] == -1:
            items.pop()
        out: list[str] = []
        L = self.list_length
        if len(items) != L:
            out.append(f"list has {len(items)} items, expected {L}")
        bad = [i for i in items if not 0 <= i < self.n or not self.real[i]]
        if bad:
            out.append(f"items {bad} are not real candidates")
        items = [i for i in items if 0 <= i < self.n]
        if len(set(items)) != len(items):
            out.append("an item is listed twice")
        listed = set(items)
        for i in self.forbidden_idx.tolist():
            if i in listed:
                out.append(f"forbidden item {self._name(i)} is listed")
        for j, item in enumerate(self.cs.required):
            idx = [i for i in items if self.item_ids is not None and self.item_ids[i] == item]
            if not idx:
                out.append(f"required[{j}] ({item!r}) is not listed")
        cs = self.cs
        for qi, q in enumerate(cs.quotas):
            if not (q.min or q.max is not None):
                continue
            k = L if q.within is None else min(q.within, L)
            count = sum(self._matches(q, i) for i in items[:k])
            if count < q.min or (q.max is not None and count > q.max):
                out.append(f"quotas[{qi}] ({q.describe()}): {count} in the first {k}")
        if cs.max_per_creator is not None and self.creator is not None:
            values, counts = np.unique(self.creator[items], return_counts=True) if items \
                else (np.zeros(0), np.zeros(0))
            for v, c in zip(values.tolist(), counts.tolist(), strict=True):
                if c > cs.max_per_creator:
                    out.append(f"max_per_creator ({cs.max_per_creator}): creator {v} has {c}")
        for si, sp in enumerate(cs.spacing):
            if sp.distance <= 1:
                continue
            attr = self.category if sp.attribute == "category" else self.creator
            last: dict[int, int] = {}
            for p, i in enumerate(items):
                v = int(attr[i])
                if v in last and p - last[v] < sp.distance:
                    out.append(f"spacing[{si}] ({sp.describe()}): {sp.attribute} {v} at "
                               f"positions {last[v]} and {p}")
                last[v] = p
        return out

    def _matches(self, q: Any, i: int) -> bool:
        if q.attribute == "category":
            return int(self.category[i]) == q.value
        if q.attribute == "creator":
            return int(self.creator[i]) == q.value
        if q.attribute == "cold_start":
            return bool(self.cold[i])
        return bool(self.tail[i])

    def _name(self, i: int) -> str:
        return repr(self.item_ids[i]) if self.item_ids is not None else f"#{i}"

    # ------------------------------------------------------------------ explanations

    def _components(self) -> list[tuple[str, ConstraintSet]]:
        """Each constraint on its own, with its label."""
        cs = self.cs
        parts: list[tuple[str, ConstraintSet]] = []
        for i, q in enumerate(cs.quotas):
            if q.min or q.max is not None:
                parts.append((f"quotas[{i}] ({q.describe()})", ConstraintSet(quotas=(q,))))
        if cs.max_per_creator is not None:
            parts.append((f"max_per_creator ({cs.max_per_creator})",
                          ConstraintSet(max_per_creator=cs.max_per_creator)))
        for j, item in enumerate(cs.required):
            parts.append((f"required[{j}] ({item!r})", ConstraintSet(required=(item,))))
        if cs.forbidden:
            parts.append((f"forbidden ({len(self.forbidden_idx)} of the candidates)",
                          ConstraintSet(forbidden=cs.forbidden)))
        for i, s in enumerate(cs.spacing):
            if s.distance > 1:
                parts.append((f"spacing[{i}] ({s.describe()})", ConstraintSet(spacing=(s,))))
        return parts

    def _explain(self) -> InfeasibleConstraints:
        who = f" for request {self.request_id!r}" if self.request_id is not None else ""
        L, real = self.list_length, int(self.real.sum())
        if self.problems:
            labels = [label for label, _ in self.problems]
            why = "; ".join(f"{label}: {reason}" for label, reason in self.problems)
            return InfeasibleConstraints(f"infeasible constraints{who}: {why}", labels,
                                         self.request_id)
        parts = self._components()
        keep = list(range(len(parts)))
        # Deletion filter: drop every constraint whose removal leaves the rest infeasible;
        # what remains is a minimal conflicting set.
        for j in range(len(parts)):
            trial = [k for k in keep if k != j]
            if not self._subset_feasible([parts[k][1] for k in trial]):
                keep = trial
        labels = [parts[k][0] for k in keep]
        names = " + ".join(labels) if labels else "the constraints"
        return InfeasibleConstraints(
            f"infeasible constraints{who}: no list of {L} items from the {real} candidates "
            f"satisfies {names}", labels, self.request_id)

    def _subset_feasible(self, sets: list[ConstraintSet]) -> bool:
        merged = ConstraintSet(
            quotas=tuple(q for s in sets for q in s.quotas),
            max_per_creator=next((s.max_per_creator for s in sets
                                  if s.max_per_creator is not None), None),
            required=tuple(r for s in sets for r in s.required),
            forbidden=tuple(f for s in sets for f in s.forbidden),
            spacing=tuple(p for s in sets for p in s.spacing))
        inputs = dict(self._inputs)
        sub = RequestConstraints(merged, **inputs, list_length=self.requested_length,
                                 request_id=self.request_id, max_nodes=self.max_nodes)
        return sub.feasible()

    def __repr__(self) -> str:
        return (f"RequestConstraints(request_id={self.request_id!r}, n={self.n}, "
                f"L={self.list_length}, classes={self.S}, {self.cs.to_dict()})")

