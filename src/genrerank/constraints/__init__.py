"""Business constraints on lists: a small language, per-request compilation with an exact
feasibility search, and the look-ahead masks every decoder applies.

- :mod:`.spec`: the language (:class:`ConstraintSet`, :class:`Quota`, :class:`Spacing`), its
  dict / JSON / TOML shape, :func:`load_constraints`.
- :mod:`.compile`: :func:`compile_constraints` -> :class:`RequestConstraints`
  (``check_feasible``, ``allowed(prefix)``, ``violations(items)``); the search is documented
  there.
- :mod:`.batch`: :func:`constraints_for_batch`, and the decoders' shared steps
  (:func:`prepare_constraints`, :func:`allowed_mask`).
- :mod:`.skeleton`: the hierarchical generator's plan (counts per category) -> category quotas
  (:func:`plan_counts_np`, :func:`skeleton_constraints`, :func:`merge_plan`), numpy only.

Every decoder takes ``constraints=constraints_for_batch(cs, batch, list_length)``::

    from genrerank.constraints import ConstraintSet, Quota, constraints_for_batch
    cs = ConstraintSet(quotas=(Quota("cold_start", min=1, within=3),), max_per_creator=2)
    lists = decode("greedy", log_probs, batch.candidate_mask, m,
                   constraints=constraints_for_batch(cs, batch, m))
"""

from genrerank.constraints.batch import (
    allowed_mask,
    apply_allowed,
    batch_item_ids,
    constraints_for_batch,
    prepare_constraints,
)
from genrerank.constraints.compile import (
    DEFAULT_MAX_NODES,
    ConstraintSearchLimit,
    InfeasibleConstraints,
    RequestConstraints,
    compile_constraints,
)
from genrerank.constraints.skeleton import (
    merge_plan,
    plan_constraints,
    plan_counts_np,
    skeleton_constraints,
)
from genrerank.constraints.spec import (
    ATTRIBUTES,
    ConstraintSet,
    ConstraintSpecError,
    Quota,
    Spacing,
    constraints_from_config,
    load_constraints,
)

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_MAX_NODES",
    "ConstraintSearchLimit",
    "ConstraintSet",
    "ConstraintSpecError",
    "InfeasibleConstraints",
    "Quota",
    "RequestConstraints",
    "Spacing",
    "allowed_mask",
    "apply_allowed",
    "batch_item_ids",
    "compile_constraints",
    "constraints_for_batch",
    "constraints_from_config",
    "load_constraints",
    "merge_plan",
    "plan_constraints",
    "plan_counts_np",
    "prepare_constraints",
    "skeleton_constraints",
]
