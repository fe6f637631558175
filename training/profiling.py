"""`--profile`: a torch profiler trace of a few training steps, to see where a step's time goes.

The trace (OUT/profile.json, Chrome's trace format) opens in Perfetto (ui.perfetto.dev): one row
per host thread and, on a GPU, per CUDA stream, with every operator and kernel of the steps.
The loop calls the profiler's `step()` after each optimizer step and `stop()` at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch


def start_profiler(out: Path | None, device: torch.device):
    """Trace steps 3-5 (after warm-up and compilation) to OUT/profile.json, viewable in Perfetto."""
    from torch.profiler import ProfilerActivity, profile, schedule

    if out is None:
        raise ValueError("--profile needs --out: the trace is written there")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=1, warmup=1, active=3, repeat=1),
                   on_trace_ready=lambda p: p.export_chrome_trace(str(out / "profile.json")))
    prof.start()
    return prof
