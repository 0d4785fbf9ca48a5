"""Training: one loop for teachers and students over the DDP and DeepSpeed backends.

Modules (import them directly; this package stays import-light):

* :mod:`~hpckd.train.experiment` -- ``load_experiment``: the config plus every section's own validation.
* :mod:`~hpckd.train.engine` -- ``run(cfg, mode, hooks)``: the epoch loop, checkpoints, results, logs.
* :mod:`~hpckd.train.step` -- :class:`~hpckd.train.step.DistillStep`: batch ops, teachers, student, loss for one
  micro-batch.
* :mod:`~hpckd.train.backends` -- ``dist.backend: ddp | deepspeed`` (ZeRO 0/1/2): one meaning of
  ``forward``/``backward``/``step`` for both.
* :mod:`~hpckd.train.build` -- the teacher source and the student, built alike for training and ``hpckd eval``.
* :mod:`~hpckd.train.evaluation` -- the one evaluation pass and ``hpckd eval``.
* :mod:`~hpckd.train.optim` -- SGD (momentum, Nesterov) / AdamW, norm/bias weight-decay exclusion, warmup, cosine
  with a floor, multistep with gamma or explicit factors, the linear LR-scaling rule (``optim.lr_reference_batch``).
* :mod:`~hpckd.train.preempt` -- SIGUSR2/SIGTERM: checkpoint at the next step boundary, then requeue / exit.
* :mod:`~hpckd.train.job` -- ``TrainJob``, a submitit ``Checkpointable`` run.
* :mod:`~hpckd.train.progress`, :mod:`~hpckd.train.rng`, :mod:`~hpckd.train.monitor`, :mod:`~hpckd.train.options`
  -- bookkeeping, RNG states, logs/progress, option checks.

Precision lives in :mod:`hpckd.precision` and checkpoints in :mod:`hpckd.checkpoint` (below teachers and train).

What a user sets (all in the experiment YAML or as dotted overrides):

    dist:  {backend: deepspeed, zero_stage: 2, sync_bn: false, nproc_per_node: 2}
    train: {precision: bf16, channels_last: true, compile: false, checkpoint_every: 500, keep_last: 2,
            tensorboard: false, preempt_signals: [USR2, TERM], requeue: true}
    optim: {name: sgd, lr: 0.1, lr_reference_batch: 256, accum_steps: 2, clip_grad_norm: 0.0,
            wd_exclude_norm_bias: true, schedule: cosine, min_lr: 1.0e-4, warmup_epochs: 5}
    resume: auto            # auto (default) | never | path/to/checkpoints/step-00001234(.pt)

``data.batch_size`` is the global batch of one optimizer step, split over ranks and accumulation micro-batches; the
learning rate belongs to it (see :mod:`hpckd.train.optim` for scaling it to another batch).
"""
