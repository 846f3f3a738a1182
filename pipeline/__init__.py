"""Pufferfish: train the best small language model your hardware can produce in the time given.

Each sub-package is one stage of the flow: `data` (sources, tokenizer, packed cache, loader),
`train` (the engine shared by calibration trials and the full run), `autotune` (probe, calibrate,
fit, plan), `registry` (MLflow models) and the `generate` / `models` commands.
"""
__version__ = "0.1.0"
