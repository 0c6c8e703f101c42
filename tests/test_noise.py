"""Tests of the noise sources: threaded fills, reused buffers and the shifted pool."""

from __future__ import annotations

import gc

import pytest
import torch

from bnnify.bnn import noise as noise_module
from bnnify.bnn.noise import NoisePool, ShiftedNoise, signs
from bnnify.enums import NoiseMode
from bnnify.errors import InvalidArgumentError

CPU = torch.device("cpu")


def test_threaded_noise_is_reproducible_and_standard(monkeypatch):
    monkeypatch.setattr(noise_module, "_NOISE_MIN", 1000)
    torch.manual_seed(3)
    a = noise_module.standard_normal(40_000, torch.float32, CPU)
    torch.manual_seed(3)
    b = noise_module.standard_normal(40_000, torch.float32, CPU, out=torch.empty(40_000))
    assert torch.equal(a, b)
    assert abs(float(a.mean())) < 4 / 200 and abs(float(a.std()) - 1) < 0.02
    pieces = a.reshape(4, -1)
    assert not torch.equal(pieces[0], pieces[1])  # independently seeded pieces
    correlation = torch.corrcoef(pieces)[0, 1]
    assert abs(float(correlation)) < 4 / 100


def test_the_pool_lends_a_buffer_until_it_is_released():
    pool = NoisePool()
    first = pool.draw(1000, torch.float32, CPU)
    second = pool.draw(1000, torch.float32, CPU)  # the first is still lent
    second_pointer = second.tensor.data_ptr()
    assert first.tensor.data_ptr() != second_pointer
    pointer = first.tensor.data_ptr()
    first.release()
    first.release()  # idempotent
    third = pool.draw(1000, torch.float32, CPU)
    assert third.tensor.data_ptr() == pointer
    del second
    gc.collect()  # a lease dropped without release gives its buffer back too
    fourth = pool.draw(1000, torch.float32, CPU)
    assert fourth.tensor.data_ptr() == second_pointer
    assert pool.draw(10, torch.float64, CPU).tensor.dtype == torch.float64


def test_noise_mode_parses_the_words():
    assert NoiseMode.parse("SHIFTED") is NoiseMode.SHIFTED
    assert NoiseMode.parse(NoiseMode.FRESH) is NoiseMode.FRESH
    with pytest.raises(InvalidArgumentError, match="fresh, shifted"):
        NoiseMode.parse("cheap")


def test_signs_are_balanced_and_differ_between_seeds_and_neighbours():
    n = 200_000
    a = signs(torch.tensor(0), torch.tensor(12345), n, torch.float64)
    b = signs(torch.tensor(0), torch.tensor(12346), n, torch.float64)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    bound = 5 / n**0.5  # five standard errors of a mean of n independent signs
    assert abs(float(a.mean())) < bound
    assert abs(float((a * b).mean())) < bound  # seeds one apart are unrelated
    assert abs(float((a[1:] * a[:-1]).mean())) < bound  # so are neighbours
    shifted = signs(torch.tensor(1000), torch.tensor(12345), n - 1000, torch.float64)
    assert torch.equal(shifted, a[1000:])  # a function of (index, seed) only


@pytest.mark.parametrize("offset", [0, 5, 2**20 - 3])
def test_shifted_pieces_wrap_around_the_pool(offset):
    shifted = ShiftedNoise(1000, torch.float64, CPU)
    size = shifted.pool.numel()
    assert size == ShiftedNoise.MIN_POOL
    pieces = shifted.pieces(10, 20, offset)
    assert sum(b - a for a, b, _ in pieces) == 10 and len(pieces) <= 2
    eps = shifted.eps(10, 20, offset, seed=7)
    expected = shifted.pool[[(i + offset) % size for i in range(10, 20)]]
    torch.testing.assert_close(eps.abs(), expected.abs(), rtol=0, atol=0)


def _draw(shifted: ShiftedNoise) -> torch.Tensor:
    offset, seed, lease = shifted.step()
    eps = shifted.eps(0, shifted.numel, offset, seed)
    lease.release()
    return eps


def test_shifted_steps_are_fresh_draws_of_the_same_pool():
    torch.manual_seed(0)
    shifted = ShiftedNoise(4000, torch.float64, CPU)
    steps = torch.stack([_draw(shifted) for _ in range(300)])
    n = steps.numel()
    assert abs(float(steps.mean())) < 5 / n**0.5
    assert abs(float(steps.square().mean()) - 1) < 5 * 2**0.5 / n**0.5
    # Uncorrelated between consecutive steps, element by element.
    lagged = (steps[1:] * steps[:-1]).mean()
    assert abs(float(lagged)) < 5 / (n - 4000) ** 0.5
    torch.manual_seed(0)
    again = ShiftedNoise(4000, torch.float64, CPU)
    assert torch.equal(_draw(again), steps[0])  # seeded


def test_the_pool_is_renewed_part_by_part_while_no_sample_needs_it(monkeypatch):
    monkeypatch.setattr(ShiftedNoise, "MIN_POOL", 1)
    shifted = ShiftedNoise(6400, torch.float64, CPU)
    first = shifted.pool.clone()
    leases = [shifted.step()[2] for _ in range(3)]  # three samples before a backward pass
    changed = (shifted.pool != first).reshape(ShiftedNoise.REFRESH, -1).all(1)
    assert changed.tolist() == [True] + [False] * (ShiftedNoise.REFRESH - 1)
    for lease in leases:
        lease.release()
    for _ in range(ShiftedNoise.REFRESH - 1):
        shifted.step()[2].release()
    assert (shifted.pool != first).all()  # every part redrawn once
