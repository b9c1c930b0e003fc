"""zero_ext: ZeRO-sharded data-parallel training for PyTorch.

Importing the package loads the compiled core, zero_ext._C, which registers the
torch.ops.zero_ext.* operators; zero_ext.ops holds their typed Python wrappers and
zero_ext.optim the optimizers built on them; zero_ext.initialize wraps a model in the ZeRO
engine.
"""

import torch  # noqa: F401  (the ops register into this torch)

try:
    from zero_ext import _C  # noqa: F401
except ImportError as error:  # pragma: no cover - only reached on a broken install
    raise ImportError(
        "zero_ext's compiled core (zero_ext._C) failed to load: "
        f"{error}. It is built by `pip install --no-build-isolation .` against the installed "
        "torch; reinstall after changing torch versions, and check that the build printed "
        "'zero_ext: building CPU kernels'."
    ) from error

from zero_ext import checkpointing, ops, optim
from zero_ext.arguments import add_config_arguments, init_distributed
from zero_ext.config import ZeroConfig
from zero_ext.elastic_sampler import ElasticSampler
from zero_ext.engine import ZeroEngine, initialize
from zero_ext.zero.gathered import GatheredParameters
from zero_ext.zero.leaves import set_z3_leaf_modules
from zero_ext.zero.params import Init, register_external_parameter

# The same function under the name DeepSpeed's examples use.
initialize_engine = initialize


def __getattr__(name):
    # zero_ext.consolidate is the function; importing it lazily keeps the submodule of the
    # same name (the CLI, `python -m zero_ext.consolidate`) from being imported first.
    if name == "consolidate":
        from zero_ext.checkpoint import consolidate
        return consolidate
    raise AttributeError(f"module 'zero_ext' has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "ElasticSampler",
    "GatheredParameters",
    "Init",
    "ZeroConfig",
    "ZeroEngine",
    "__version__",
    "add_config_arguments",
    "checkpointing",
    "consolidate",
    "init_distributed",
    "initialize",
    "initialize_engine",
    "ops",
    "optim",
    "register_external_parameter",
    "set_z3_leaf_modules",
]
