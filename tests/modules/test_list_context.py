"""List context: the teacher-forced matrix and the incremental decoding state are one function,
hand-checked on a small case, and padded positions are no context."""

from __future__ import annotations

import torch

from genrerank.modules.list_context import ListContext


def _context(n_categories: int = 4, decay: float = 0.5) -> ListContext:
    ctx = ListContext(n_categories)
    with torch.no_grad():
        ctx.pair.copy_(torch.arange(n_categories**2, dtype=torch.float32).view(n_categories, -1))
        ctx.decay_logit.fill_(float(torch.logit(torch.tensor(decay))))
    return ctx


def test_a_fresh_table_adds_nothing() -> None:
    ctx = ListContext(5)
    category = torch.randint(0, 5, (3, 7))
    exposed = torch.randint(0, 7, (3, 4))
    out = ctx.teacher_forced(category, exposed, torch.ones(3, 4, dtype=torch.bool))
    assert out.shape == (3, 7, 4) and torch.equal(out, torch.zeros_like(out))


def test_hand_computed_values() -> None:
    # Candidates' categories [1, 2, 1]; the list shows candidate 0 (cat 1), then 1 (cat 2).
    ctx = _context(decay=0.5)
    pair = ctx.pair.detach()
    category = torch.tensor([[1, 2, 1]])
    out = ctx.teacher_forced(category, torch.tensor([[0, 1, 2]]), torch.ones(1, 3, dtype=bool))
    torch.testing.assert_close(out[0, :, 0], torch.zeros(3))  # nothing shown above slot 0
    torch.testing.assert_close(out[0, :, 1], pair[1, category[0]])
    torch.testing.assert_close(out[0, :, 2], 0.5 * pair[1, category[0]] + pair[2, category[0]])


def test_incremental_state_matches_the_teacher_forced_matrix() -> None:
    torch.manual_seed(0)
    ctx = ListContext(6)
    with torch.no_grad():
        ctx.pair.normal_()
        ctx.decay_logit.fill_(0.7)
    category = torch.randint(0, 6, (4, 9))
    exposed = torch.stack([torch.randperm(9)[:5] for _ in range(4)])
    forced = ctx.teacher_forced(category, exposed, torch.ones(4, 5, dtype=torch.bool))
    state = torch.zeros(4, 9)
    for t in range(5):
        torch.testing.assert_close(state, forced[:, :, t])
        state = ctx.step(state, category, exposed[:, t])


def test_padded_positions_are_no_context() -> None:
    ctx = _context()
    category = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[True, True, False]])
    # Whatever the padded slot holds, the real slots see the same context.
    a = ctx.teacher_forced(category, torch.tensor([[0, 1, 2]]), mask)
    b = ctx.teacher_forced(category, torch.tensor([[0, 1, 3]]), mask)
    torch.testing.assert_close(a[..., :2], b[..., :2])
    torch.testing.assert_close(a[..., 2], b[..., 2])  # slot 2 itself sees slots 0 and 1 only


def test_categories_beyond_the_table_are_clamped_not_an_error() -> None:
    ctx = _context(n_categories=3)
    out = ctx.teacher_forced(torch.tensor([[5, 1]]), torch.tensor([[0, 1]]),
                             torch.ones(1, 2, dtype=torch.bool))
    torch.testing.assert_close(out[0, :, 1], ctx.pair.detach()[2, torch.tensor([2, 1])])
