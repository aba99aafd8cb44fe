"""Drive a load: probe the target, build the workload, send it on schedule, collect.

``run_load`` (sync) and ``arun_load`` (async) are the entry points for the CLI
and for tests. One call probes the target once (``ListModels``: a dead target
is a ``TargetError`` before anything is sent), builds the conversations once,
then runs them once per request rate (several rates = a sweep), each run on a
fresh clock. Within a run:

1. a launcher walks the arrival schedule and starts one task per conversation
   at its send time; it stops launching at ``max_duration_s`` or when the run
   is stopped;
2. a conversation task sends its turns one after the other (a failed turn ends
   its session), each under the in-flight cap if there is one;
3. every request sent leaves a ``RequestResult``; requests never sent are
   counted as ``not_sent``, so planned = completed + failed + not_sent;
4. ``abort_after_unavailable`` consecutive ``UNAVAILABLE`` errors mean the
   server is gone: the run stops and reports what completed, with the errors.

With a ``worker_stats`` reader (``--worker-stats``), the workers' counters are
read before and after each run and the run keeps the differences
(:mod:`.worker_stats`).

Bounds: at most ``MAX_REQUESTS`` requests; no request is started after
``max_duration_s``; each has a deadline of ``request_timeout_s``.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from tqdm import tqdm

from ._api import serving_pb2 as pb
from .arrivals import Arrival
from .client import GenerationClient
from .metrics import OK, RequestResult, Slo, summarize, summarize_by_turn
from .tokens import TokenSource
from .workloads import Conversation, Workload

MAX_REQUESTS = 100_000
SETTLE_S = 0.3
"""After a run, before reading the workers' counters: a worker counts a request after its stream ends."""


@dataclass(frozen=True)
class LoadOptions:
    """Everything about a load besides the workload, the arrivals and the SLO."""

    num_prompts: int | None = 100
    """Requests in all (``None``: a whole trace, up to ``MAX_REQUESTS`` lines); at most ``MAX_REQUESTS``."""
    connections: int = 4
    request_timeout_s: float = 300.0
    max_duration_s: float = 600.0
    """No request starts later than this after a run's start."""
    model: str = ""
    ignore_eos: bool = True
    temperature: float | None = None
    prompt_source: str = "ids"
    seed: int = 0
    probe_timeout_s: float = 10.0
    wait_for_server_s: float = 0.0
    abort_after_unavailable: int = 10
    progress: bool = False
    handle_sigint: bool = False
    """Ctrl-C stops the run and keeps the partial report (CLI only)."""
    backend: str = "grpc"
    """``grpc`` (the router's Generate) or ``openai`` (its HTTP API: ``/v1/completions``, streamed)."""

    def __post_init__(self) -> None:
        n = self.num_prompts
        if n is not None and not 1 <= n <= MAX_REQUESTS:
            raise ValueError(f"num-prompts must be in [1, {MAX_REQUESTS}], got {n}")
        if not (self.request_timeout_s > 0 and self.max_duration_s > 0):
            raise ValueError("request-timeout and max-duration must be > 0 seconds")
        if self.abort_after_unavailable < 1:
            raise ValueError("abort-after-unavailable must be >= 1")


@dataclass
class RunResult:
    """One load at one arrival setting."""

    label: str
    arrival: Arrival
    planned: int
    started_at: str
    duration_s: float = 0.0
    aborted: str | None = None
    results: list[RequestResult] = field(default_factory=list)
    worker_stats: dict[str, Any] | None = None
    """The workers' counters over the run (:func:`.worker_stats.deltas`), when they were read."""

    def summary(self, slo: Slo | None) -> dict[str, Any]:
        return summarize(self.results, self.duration_s, slo, self.planned)

    def summary_by_kind(self, slo: Slo | None) -> dict[str, dict[str, Any]]:
        kinds = sorted({r.kind for r in self.results})
        if len(kinds) < 2:
            return {}
        return {k: summarize([r for r in self.results if r.kind == k], self.duration_s, slo)
                for k in kinds}

    def summary_by_turn(self) -> list[dict[str, Any]]:
        return summarize_by_turn(self.results)


@dataclass
class LoadReport:
    target: str
    workload: dict[str, Any]
    options: LoadOptions
    slo: Slo | None
    models: list[dict[str, Any]]
    runs: list[RunResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Run:
    """The launcher, the conversation tasks and the shared stop flag of one run."""

    def __init__(self, client: GenerationClient, convs: list[Conversation], arrival: Arrival,
                 opts: LoadOptions, think_time_s: float, bar: tqdm | None):
        self.client, self.convs, self.arrival, self.opts = client, convs, arrival, opts
        self.think_time_s, self.bar = think_time_s, bar
        self.tag = uuid.uuid4().hex[:8]
        self.out = RunResult(arrival.label(), arrival, sum(len(c.turns) for c in convs), _now_iso())
        self.stopped = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.unavailable_streak = 0
        self.sem = asyncio.Semaphore(arrival.concurrency) if arrival.concurrency else None

    def stop(self, reason: str) -> None:
        if not self.stopped.is_set():
            self.out.aborted = reason
            self.stopped.set()

    def interrupt(self) -> None:
        self.stop("interrupted (Ctrl-C)")
        for t in self.tasks:
            t.cancel()

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early if the run is stopped."""
        if seconds > 0:
            try:
                await asyncio.wait_for(self.stopped.wait(), seconds)
            except asyncio.TimeoutError:
                pass

    def _may_start(self) -> bool:
        if time.perf_counter() - self.t0 > self.opts.max_duration_s:
            self.stop(f"time limit: no request starts after {self.opts.max_duration_s:g} s")
        return not self.stopped.is_set()

    async def execute(self) -> RunResult:
        self.t0 = time.perf_counter()
        if self.arrival.process == "trace":
            offsets = [c.arrival_s for c in self.convs]
        else:
            offsets = self.arrival.schedule(len(self.convs))
        first = 0
        for conv, offset in zip(self.convs, offsets):
            await self._sleep(self.t0 + offset - time.perf_counter())
            if not self._may_start():
                break
            self.tasks.append(asyncio.create_task(self._conversation(conv, first, float(offset))))
            first += len(conv.turns)
        await asyncio.gather(*self.tasks, return_exceptions=True)
        ends = [r.start_s + r.end_s for r in self.out.results if r.end_s is not None]
        self.out.duration_s = max(ends, default=time.perf_counter() - self.t0)
        self.out.results.sort(key=lambda r: r.index)
        return self.out

    async def _conversation(self, conv: Conversation, first: int, offset: float) -> None:
        replies: list[list[int]] = []
        for t, turn in enumerate(conv.turns):
            if t > 0:
                await self._sleep(self.think_time_s)
            if not self._may_start():
                return
            if self.sem is None:
                result = await self._send(conv, t, first + t, replies, offset if t == 0 else None)
            else:
                async with self.sem:
                    if not self._may_start():
                        return
                    result = await self._send(conv, t, first + t, replies, offset if t == 0 else None)
            if not result.ok:
                return  # a session does not go on past a failed turn; the rest is not_sent
            replies.append(result.reply_ids)

    async def _send(self, conv: Conversation, t: int, index: int, replies: list[list[int]],
                    scheduled: float | None) -> RequestResult:
        turn = conv.turns[t]
        prompt = conv.prompt_ids(t, replies)
        session = f"lt{self.tag}-{conv.session_id}" if conv.session_id else ""
        rid = f"lt{self.tag}-{index}"
        result = RequestResult(index=index, kind=conv.kind, session_id=session, turn=t, request_id=rid,
                               input_tokens=len(prompt), requested_output_tokens=turn.output_len,
                               scheduled_s=None if self.arrival.process == "closed" else scheduled)
        sampling = pb.SamplingParams(max_tokens=turn.output_len, ignore_eos=self.opts.ignore_eos)
        if self.opts.temperature is not None:
            sampling.temperature = self.opts.temperature
        request = pb.GenerateRequest(model=self.opts.model, token_ids=pb.TokenIds(ids=prompt),
                                     sampling=sampling, session_id=session, request_id=rid)
        self.out.results.append(result)  # recorded before sending: a cancellation still leaves it
        try:
            await self.client.generate(request, result, self.t0, self.opts.request_timeout_s)
        finally:
            self._account(result)
        return result

    def _account(self, r: RequestResult) -> None:
        if self.bar is not None:
            self.bar.update(1)
        if r.status == "UNAVAILABLE":
            self.unavailable_streak += 1
            if self.unavailable_streak >= self.opts.abort_after_unavailable:
                self.stop(f"target unavailable: {self.unavailable_streak} consecutive UNAVAILABLE errors")
        elif r.status == OK:
            self.unavailable_streak = 0


async def arun_load(target: str, workload: Workload, arrival: Arrival = Arrival(), *,
                    slo: Slo | None = None, rates: Sequence[float] | None = None, api_token: str | None = None,
                    worker_stats: Any = None, **options: Any) -> LoadReport:
    """Load ``target`` with ``workload``; one run per rate in ``rates`` (a sweep) or one run.

    ``options`` are ``LoadOptions`` fields (``num_prompts=20, connections=2, …``). ``api_token``: the
    router's public API token (default ``$DSV32_API_TOKEN``); kept out of the options and the report.
    ``worker_stats``: a :class:`.worker_stats.WorkerStatsReader` (anything with ``snapshot()``) to read the
    workers' counters around each run.
    Raises ``TargetError`` when nothing answers at ``target``, ``ValueError`` on a
    bad parameter (a malformed trace is a ``TraceError``, which is one).
    """
    opts = LoadOptions(**options)
    arrivals = [arrival] if not rates else [_with_rate(arrival, r) for r in rates]
    if opts.backend not in ("grpc", "openai"):
        raise ValueError(f"backend must be grpc or openai, got {opts.backend!r}")
    if opts.backend == "openai":
        from .openai_client import OpenAIClient as client_class
    else:
        client_class = GenerationClient
    async with client_class(target, opts.connections, api_token=api_token) as client:
        models = await client.probe(opts.probe_timeout_s, opts.wait_for_server_s)
        vocab = next((m["vocab_size"] for m in models if m["vocab_size"]), None)
        tokens = TokenSource(opts.seed, vocab, opts.prompt_source)
        convs = workload.build(opts.num_prompts or MAX_REQUESTS, tokens)  # None: a whole trace, bounded
        if arrival.process == "trace" and any(c.arrival_s is None for c in convs):
            raise ValueError("trace arrivals need a trace workload (timestamps)")
        report = LoadReport(target, workload.describe(), opts, slo, models,
                            warnings=_length_warnings(convs, models))
        for arr in arrivals:
            before = await asyncio.to_thread(worker_stats.snapshot) if worker_stats is not None else None
            report.runs.append(await _run_once(client, convs, arr, opts, workload.think_time_s))
            if worker_stats is not None:
                from .worker_stats import deltas

                await asyncio.sleep(SETTLE_S)
                try:
                    report.runs[-1].worker_stats = deltas(before, await asyncio.to_thread(worker_stats.snapshot))
                except ValueError as e:  # the load's results are kept all the same
                    report.warnings.append(str(e))
            if report.runs[-1].aborted and not report.runs[-1].aborted.startswith("time limit"):
                break  # a dead or interrupted target: the later rates would say nothing new
    return report


def run_load(target: str, workload: Workload, arrival: Arrival = Arrival(), **kwargs: Any) -> LoadReport:
    """Synchronous ``arun_load`` (its own event loop)."""
    return asyncio.run(arun_load(target, workload, arrival, **kwargs))


def _with_rate(arrival: Arrival, rate: float) -> Arrival:
    if arrival.process not in ("poisson", "gamma"):
        raise ValueError(f"a rate sweep needs poisson or gamma arrivals, not {arrival.process}")
    return Arrival(**{**asdict(arrival), "rate": float(rate)})


async def _run_once(client: GenerationClient, convs: list[Conversation], arrival: Arrival,
                    opts: LoadOptions, think_time_s: float) -> RunResult:
    total = sum(len(c.turns) for c in convs)
    bar = tqdm(total=total, desc=arrival.label(), unit="req", leave=True) if opts.progress else None
    run = _Run(client, convs, arrival, opts, think_time_s, bar)
    loop = asyncio.get_running_loop()
    if opts.handle_sigint:
        loop.add_signal_handler(signal.SIGINT, run.interrupt)
    try:
        return await run.execute()
    finally:
        if opts.handle_sigint:
            loop.remove_signal_handler(signal.SIGINT)
        if bar is not None:
            bar.close()


def _length_warnings(convs: list[Conversation], models: list[dict[str, Any]]) -> list[str]:
    limit = min((m["max_model_len"] for m in models if m["max_model_len"]), default=0)
    if not limit:
        return []
    over = sum(len(c.prefix_ids) + sum(len(t.user_ids) + t.output_len for t in c.turns) > limit
               for c in convs)
    if not over:
        return []
    return [f"{over} of {len(convs)} conversations exceed the served max_model_len {limit}: "
            "expect OUT_OF_RANGE errors"]
