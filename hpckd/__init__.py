"""hpckd: distributed knowledge distillation for data-augmentation studies.

Data flows top to bottom through the sub-packages: ``data`` (loaders -> :class:`~hpckd.data.batch.Batch`),
``models``, ``teachers`` (teacher logits), ``losses`` (named terms), ``train`` (one loop), ``metrics``,
``sweep`` (stages on SLURM) and ``report``.
"""

__version__ = "0.1.0"
