"""Training: one loop for teachers and students over the DDP and DeepSpeed backends.

Modules (import them directly; this package stays import-light because :mod:`hpckd.config` consults
:mod:`hpckd.train.options` while loading a config):

* :mod:`~hpckd.train.engine` -- ``run(cfg, mode)``: the loop, evaluation, checkpoints, results, logs.
* :mod:`~hpckd.train.backends` -- ``dist.backend: ddp | deepspeed`` (ZeRO 0/1/2), accumulation, clipping.
* :mod:`~hpckd.train.precision` -- ``train.precision: fp32 | bf16 | fp16`` (autocast; GradScaler for fp16).
* :mod:`~hpckd.train.optim` -- SGD (momentum, Nesterov) / AdamW, norm/bias weight-decay exclusion, warmup, cosine
  with a floor, multistep with gamma or explicit factors, the linear LR-scaling rule (``optim.lr_reference_batch``).
* :mod:`~hpckd.train.checkpoint` -- atomic full-state checkpoints (file for DDP, folder for DeepSpeed), keep-last-N,
  newest-valid resume with fallback, config compatibility.
* :mod:`~hpckd.train.preempt` -- SIGUSR2/SIGTERM: checkpoint at the next step boundary, then requeue / exit.
* :mod:`~hpckd.train.job` -- ``TrainJob``, a submitit ``Checkpointable`` run.
* :mod:`~hpckd.train.rng`, :mod:`~hpckd.train.monitor`, :mod:`~hpckd.train.options` -- RNG states, logs/progress,
  option checks.

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
