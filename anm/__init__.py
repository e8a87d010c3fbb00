"""anm — Activation-Norm Maximization for PyTorch transformers.

The happy path is one line: ``model = anm.ANM(model)`` and ``loss = task_loss + model.loss()``.

Example:
    >>> import anm
    >>> sorted(anm.__all__)[:4]
    ['ANM', 'ANMError', 'ANMLoss', 'ActivationCollector']
"""

from .collector import ActivationCollector
from .errors import ANMError
from .hidden_states import hidden_state_norms
from .layers import find_blocks, select_layers
from .loss import ANMLoss, anm_loss
from .norms import activation_norms
from .regularizer import Regularizer, attach
from .schedule import warmup_weight
from .wrapper import ANM

__version__ = "0.1.0"

__all__ = [
    "ANM",
    "ANMError",
    "ANMLoss",
    "ActivationCollector",
    "Regularizer",
    "activation_norms",
    "anm_loss",
    "attach",
    "find_blocks",
    "hidden_state_norms",
    "select_layers",
    "warmup_weight",
    "__version__",
]
