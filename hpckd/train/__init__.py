"""Training: one loop (:func:`hpckd.train.engine.run`) over the DDP and DeepSpeed backends, full-state
checkpoints with exact resume, preemption handling, schedules and mixed precision.

Import the submodules directly (``from hpckd.train.engine import run``); this package stays import-light
because :mod:`hpckd.config` consults :mod:`hpckd.train.options` while loading a config.
"""
