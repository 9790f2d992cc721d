"""phalanx: adversarially robust deep ensembles.

Train ensembles whose members do not share vulnerabilities, attack them as a real adversary
would, and verify them formally.
"""

from phalanx import _moved
from phalanx.data import DatasetSplits, load_dataset
from phalanx.ensembles import Combiner, Ensemble, load_ensemble, save_ensemble
from phalanx.errors import PhalanxError
from phalanx.models import MODELS, create_model
from phalanx.training import METHODS, TrainConfig, TrainingMethod, create_method, fit
from phalanx.types import Norm, ThreatModel

__version__ = "0.2.0"

_moved.install()  # old import paths of the 0.2 layout, with a DeprecationWarning

__all__ = [
    "METHODS", "MODELS", "Combiner", "DatasetSplits", "Ensemble", "Norm", "PhalanxError",
    "ThreatModel", "TrainConfig", "TrainingMethod", "__version__", "create_method", "create_model",
    "fit", "load_dataset", "load_ensemble", "save_ensemble",
]
