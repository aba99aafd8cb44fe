"""Arrival processes: mean rate and dispersion within statistical bounds (seeded runs).

For gamma gaps of shape b (vLLM's burstiness) the gaps' coefficient of
variation is 1/sqrt(b), and for counts in long windows the index of dispersion
(variance / mean) of a renewal process tends to CV² = 1/b: 1 for Poisson.
Bounds are about four standard deviations of each estimate at n = 20 000
(measured over 50 seeds: e.g. the rate's relative sd is 0.7 % for b = 1).
"""

import math

import numpy as np
import pytest

from dsv32_loadtest.arrivals import Arrival

N, RATE = 20_000, 5.0


@pytest.mark.parametrize("process, burstiness", [("poisson", 1.0), ("gamma", 0.25), ("gamma", 1.0), ("gamma", 4.0)],
                         ids=["poisson", "gamma-bursty", "gamma-1", "gamma-regular"])
def test_rate_and_dispersion(process, burstiness):
    t = Arrival(process, rate=RATE, burstiness=burstiness, seed=7).schedule(N)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0) and len(t) == N
    gaps = np.diff(t)
    cv = 1 / math.sqrt(burstiness)
    assert abs((N - 1) / t[-1] / RATE - 1) < 4 * cv / math.sqrt(N)      # mean rate
    assert abs(gaps.std() / gaps.mean() / cv - 1) < 0.05                  # gap CV = 1/sqrt(b)
    counts = np.histogram(t, np.arange(0.0, t[-1], 20.0))[0]              # ~100 arrivals a window
    assert abs(counts.var() / counts.mean() * burstiness - 1) < 0.4       # index of dispersion = 1/b


def test_burstiness_orders_the_coefficient_of_variation():
    cvs = []
    for b in (0.2, 0.5, 1.0, 2.0, 8.0):
        g = np.diff(Arrival("gamma", rate=RATE, burstiness=b, seed=1).schedule(5000))
        cvs.append(g.std() / g.mean())
    assert cvs == sorted(cvs, reverse=True)
    assert cvs[2] == pytest.approx(1.0, abs=0.05)


def test_seeded_schedules_repeat():
    a = Arrival("poisson", rate=3.0, seed=11).schedule(100)
    assert np.array_equal(a, Arrival("poisson", rate=3.0, seed=11).schedule(100))
    assert not np.array_equal(a, Arrival("poisson", rate=3.0, seed=12).schedule(100))


def test_all_at_once_and_closed_loop_send_at_zero():
    assert np.all(Arrival("burst").schedule(5) == 0)
    assert np.all(Arrival("closed", concurrency=3).schedule(5) == 0)
    assert np.all(Arrival("poisson", rate=math.inf).schedule(5) == 0)
    assert len(Arrival("poisson", rate=2.0).schedule(1)) == 1


@pytest.mark.parametrize("kwargs", [
    {"process": "uniform"}, {"process": "poisson", "rate": 0}, {"process": "gamma", "burstiness": 0},
    {"process": "poisson", "burstiness": 2.0}, {"process": "closed"}, {"process": "burst", "concurrency": 0},
], ids=["unknown", "zero-rate", "zero-burstiness", "poisson-burstiness", "closed-no-users", "zero-cap"])
def test_invalid_arrivals(kwargs):
    with pytest.raises(ValueError):
        Arrival(**kwargs)


def test_labels():
    assert Arrival("poisson", rate=2).label() == "poisson 2/s"
    assert Arrival("gamma", rate=2, burstiness=0.5, concurrency=4).label() == "gamma 2/s b=0.5 c<=4"
    assert Arrival("closed", concurrency=8).label() == "closed c=8"
