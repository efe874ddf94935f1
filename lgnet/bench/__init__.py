"""`lgnet bench`, in three rooms: plan (what to run, from the options: data, no I/O), run (the
API: `run(plan) -> Report`, measuring lgnet and its anchors interleaved, printing nothing) and
report (the face: tables, ratios, --json, --plot). A script measures with

    from lgnet.bench import make_plan, run
    report = run(make_plan(sizes=[1514], seconds=0.5, rounds=1))
    report.row("stream-deep-1514")["lgnet"]["frames_s"]
"""
from lgnet.bench.plan import BenchOptions, Plan, Workload, make_plan
from lgnet.bench.run import BenchError, Report, run

__all__ = ["BenchError", "BenchOptions", "Plan", "Report", "Workload", "make_plan", "run"]
