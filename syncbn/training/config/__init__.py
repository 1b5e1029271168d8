"""train.py's configuration: the types and choices of ``conf/`` (:mod:`.schema`) and the checks
of ranges and facts about the launch (:mod:`.checks`)."""

from .checks import validate
from .schema import register

__all__ = ["register", "validate"]
