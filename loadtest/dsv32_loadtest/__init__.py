"""dsv32_loadtest: load-test a dsv32-serve cluster through its public gRPC API.

``dsv32-serve loadtest --help`` for the command line. From Python (tests)::

    from dsv32_loadtest import Arrival, Slo, SyntheticWorkload, run_load
    report = run_load("127.0.0.1:50051", SyntheticWorkload(input_len=64, output_len=16),
                      Arrival("poisson", rate=4), slo=Slo(ttft_ms=500), num_prompts=20)
    summary = report.runs[0].summary(report.slo)   # planned == completed + failed + not_sent

Modules, one noun each: ``arrivals`` (when), ``workloads`` / ``trace`` /
``tokens`` (what), ``client`` (the gRPC connections), ``runner`` (a load),
``metrics`` (the numbers), ``report`` / ``plots`` / ``compare`` (the output),
``worker_stats`` (the workers' counters around a run), ``chaos`` (faults),
``fake_server`` (a scripted Generation server for tests). Never imports torch.
"""

from .arrivals import Arrival
from .client import TargetError
from .metrics import RequestResult, Slo, summarize
from .runner import LoadOptions, LoadReport, RunResult, arun_load, run_load
from .trace import TraceError
from .workloads import MixedWorkload, SessionWorkload, SyntheticWorkload, TraceWorkload

__all__ = ["Arrival", "LoadOptions", "LoadReport", "MixedWorkload", "RequestResult", "RunResult",
           "SessionWorkload", "Slo", "SyntheticWorkload", "TargetError", "TraceError", "TraceWorkload",
           "arun_load", "run_load", "summarize"]
