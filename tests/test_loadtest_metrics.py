"""Metric math of the load tester against hand-computed examples (vLLM definitions)."""

import pytest

from dsv32_loadtest.metrics import RequestResult, Slo, describe, summarize


def _ok(index, input_tokens, chunk_times, chunk_tokens, end):
    return RequestResult(index=index, input_tokens=input_tokens, requested_output_tokens=sum(chunk_tokens),
                         start_s=0.0, chunk_times_s=chunk_times, chunk_tokens=chunk_tokens, end_s=end,
                         status="OK", server_completion_tokens=sum(chunk_tokens))


# A: 5 tokens in 4 chunks (one chunk of 2): TTFT 100 ms, E2E 350 ms, TPOT 250/4 = 62.5 ms, ITL 50, 100, 50.
A = _ok(0, 10, [0.10, 0.15, 0.25, 0.30], [1, 1, 2, 1], 0.35)
# B: a single token: TTFT = E2E = 200 ms, no TPOT (and no ITL).
B = _ok(1, 20, [0.20], [1], 0.20)
# C: failed; D: 3 tokens, TTFT 50 ms, E2E 100 ms, TPOT 50/2 = 25 ms, ITL 20, 20.
C = RequestResult(index=2, input_tokens=30, start_s=0.0, end_s=0.01, status="UNAVAILABLE", error="gone")
D = _ok(3, 40, [0.05, 0.07, 0.09], [1, 1, 1], 0.10)


def test_per_request_metrics():
    assert A.ttft_s == pytest.approx(0.10)
    assert A.e2e_s == pytest.approx(0.35)
    assert A.output_tokens == 5
    assert A.tpot_s == pytest.approx(0.0625)
    assert A.itl_s == pytest.approx([0.05, 0.10, 0.05])
    assert B.tpot_s is None and B.itl_s == [] and B.e2e_s == pytest.approx(0.2)
    assert D.tpot_s == pytest.approx(0.025)
    assert C.ttft_s is None and C.e2e_s is None and C.tpot_s is None


def test_summary_counts_throughput_and_percentiles():
    s = summarize([A, B, C, D], duration_s=2.0)
    assert (s["planned"], s["sent"], s["completed"], s["failed"], s["not_sent"]) == (4, 4, 3, 1, 0)
    assert s["errors"] == {"UNAVAILABLE": 1}
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["total_input_tokens"] == 70 and s["input_throughput"] == pytest.approx(35.0)
    assert s["total_output_tokens"] == 9 and s["output_throughput"] == pytest.approx(4.5)
    # numpy.percentile, linear interpolation: sorted TTFT [50, 100, 200] ms,
    # p90 at position 1.8 -> 100 + 0.8 * 100 = 180; p99 at 1.98 -> 198.
    assert s["ttft_ms"]["mean"] == pytest.approx(350 / 3)
    assert s["ttft_ms"]["median"] == pytest.approx(100)
    assert s["ttft_ms"]["p90"] == pytest.approx(180)
    assert s["ttft_ms"]["p99"] == pytest.approx(198)
    # TPOT [25, 62.5] (B has one token: no TPOT): p90 = 25 + 0.9 * 37.5.
    assert s["tpot_ms"]["count"] == 2
    assert s["tpot_ms"]["mean"] == pytest.approx(43.75)
    assert s["tpot_ms"]["p90"] == pytest.approx(58.75)
    assert s["tpot_ms"]["p99"] == pytest.approx(62.125)
    # ITL per chunk [20, 20, 50, 50, 100]: p90 at 3.6 -> 80, p99 at 3.96 -> 98.
    assert s["itl_ms"]["count"] == 5
    assert s["itl_ms"]["mean"] == pytest.approx(48)
    assert s["itl_ms"]["median"] == pytest.approx(50)
    assert s["itl_ms"]["p90"] == pytest.approx(80)
    assert s["itl_ms"]["p99"] == pytest.approx(98)
    assert s["e2e_ms"]["mean"] == pytest.approx(650 / 3)
    assert s["e2e_ms"]["median"] == pytest.approx(200)
    assert s["goodput"] is None and s["output_len_mismatches"] == 0


@pytest.mark.parametrize("slo, good", [
    (Slo(ttft_ms=150, tpot_ms=50), 1),   # A misses TPOT (62.5), B misses TTFT (200), D meets both
    (Slo(ttft_ms=200), 3),               # inclusive: B's 200 ms meets a 200 ms SLO
    (Slo(tpot_ms=62.5), 3),              # a one-token request has TPOT 0 for goodput
    (Slo(e2e_ms=200), 2),                # A's 350 ms misses
    (Slo(ttft_ms=10), 0),
], ids=["ttft+tpot", "ttft-inclusive", "tpot-one-token", "e2e", "none-good"])
def test_goodput(slo, good):
    s = summarize([A, B, C, D], duration_s=2.0, slo=slo)
    assert s["good_requests"] == good
    assert s["goodput"] == pytest.approx(good / 2.0)


def test_failed_request_never_meets_an_slo():
    assert not Slo(ttft_ms=1e9, tpot_ms=1e9, e2e_ms=1e9).met_by(C)


def test_planned_counts_requests_not_sent():
    s = summarize([A, C], duration_s=1.0, planned=5)
    assert (s["planned"], s["sent"], s["completed"], s["failed"], s["not_sent"]) == (5, 2, 1, 1, 3)


def test_mismatch_counters():
    short = _ok(0, 5, [0.1, 0.2], [1, 1], 0.3)
    short.requested_output_tokens = 3           # the server stopped early
    short.server_completion_tokens = 4          # and miscounted
    s = summarize([short], duration_s=1.0)
    assert s["output_len_mismatches"] == 1 and s["server_token_count_mismatches"] == 1


def test_empty_and_zero_duration():
    s = summarize([C], duration_s=0.0)
    assert s["completed"] == 0 and s["request_throughput"] is None
    assert s["ttft_ms"] == {"count": 0, **dict.fromkeys(["mean", "median", "std", "p90", "p99", "min", "max"])}


def test_describe_is_in_ms():
    d = describe([0.001, 0.003])
    assert d["mean"] == pytest.approx(2.0) and d["min"] == pytest.approx(1.0) and d["max"] == pytest.approx(3.0)


def test_slo_parse():
    assert Slo.parse("ttft=500,tpot=50") == Slo(ttft_ms=500, tpot_ms=50)
    assert Slo.parse(" E2E=1e4 ") == Slo(e2e_ms=1e4)
    for bad in ["", "ttft", "foo=1", "ttft=abc", "ttft=-1", "tpot=0"]:
        with pytest.raises(ValueError):
            Slo.parse(bad)


def test_result_round_trips_through_dict():
    d = A.to_dict()
    assert d["ttft_s"] == pytest.approx(0.1) and d["tpot_s"] == pytest.approx(0.0625)
    assert d["output_tokens"] == 5 and "reply_ids" not in d
    back = RequestResult.from_dict(d)
    assert back.tpot_s == pytest.approx(A.tpot_s) and back.itl_s == pytest.approx(A.itl_s)


def test_send_lag_against_the_schedule():
    late = _ok(0, 1, [0.1], [1], 0.1)
    late.scheduled_s, late.start_s = 1.0, 1.004
    closed = _ok(1, 1, [0.1], [1], 0.1)                   # closed loop: no schedule
    s = summarize([late, closed], duration_s=2.0)
    assert s["send_lag_ms"]["count"] == 1 and s["send_lag_ms"]["max"] == pytest.approx(4.0)
