"""Model zoo: ``create(name, num_classes)``, ``available()``."""

from hpckd.models.registry import available, create, register

__all__ = ["available", "create", "register"]
