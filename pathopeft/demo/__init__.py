"""``pathopeft demo``: the whole product on a synthetic cohort, offline, on a laptop CPU.

The demo is an orchestration of the real commands, run as ``python -m pathopeft ...``
subprocesses in the demo folder (so every step is exactly what a user would type, and its output
lands in ``logs/<stage>.log``): synth → tile → manifest → train (task 1) → add-task (task 2) →
heatmap (both tasks) → segment train/predict, then a summary table and ``demo_summary.json``.
Nothing here re-implements a stage.
"""

from pathopeft.demo.run import DemoError, DemoSettings, run_demo

__all__ = ["DemoError", "DemoSettings", "run_demo"]
