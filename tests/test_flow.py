"""Flow-matching building blocks (regionroute.flux.flow): the diffusers script's conventions, exactly."""

from __future__ import annotations

import torch

from regionroute.flux.flow import FlowSchedule, kontext_image_ids, noisy
from regionroute.tiny.kontext import build_tiny_kontext


def _schedule() -> FlowSchedule:
    return FlowSchedule(build_tiny_kontext().scheduler.config)


def test_timestep_indices_are_drawn_as_the_diffusers_script_draws_them():
    """``(u * num_train_timesteps).long()``: uniform u gives every index the same weight, ends included."""
    sched = _schedule()
    t = sched.num_train_timesteps
    u = torch.arange(10 * t, dtype=torch.float64) / (10 * t)  # a perfectly uniform grid on [0, 1)
    counts = torch.bincount(sched.indices(u), minlength=t)
    assert counts.shape == (t,) and bool((counts == 10).all())  # rounding would halve both ends
    assert sched.indices(torch.tensor([0.0, 0.9999999])).tolist() == [0, t - 1]


def test_sigmas_come_from_the_scheduler_table_and_are_reproducible():
    sched = _schedule()
    a = sched.sample(64, torch.Generator().manual_seed(3))
    b = sched.sample(64, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    table = set(sched.sigmas[:-1].tolist())
    assert all(float(s) in table for s in a) and float(a.min()) > 0 and float(a.max()) <= 1
    state = torch.random.get_rng_state()
    sched.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left untouched


def test_context_ids_have_first_coordinate_one_and_noising_interpolates():
    ids = kontext_image_ids((16, 16), torch.device("cpu"), torch.float32)  # 8 x 8 tokens per image
    assert ids.shape == (128, 3)
    assert bool((ids[:64, 0] == 0).all()) and bool((ids[64:, 0] == 1).all())
    torch.testing.assert_close(ids[:64, 1:], ids[64:, 1:])
    x0, noise = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    xt = noisy(x0, noise, torch.tensor([0.0, 0.25]))
    assert float(xt[0].abs().max()) == 0 and torch.allclose(xt[1], torch.full((4, 3), 0.25))
