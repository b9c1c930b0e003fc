"""zero_ext.integrations.pytorch_lightning: ZeroStrategy for the `pytorch_lightning` package.

    import zero_ext.integrations.pytorch_lightning  # registers "zero_ext_stage_3" etc. there
    trainer = pytorch_lightning.Trainer(strategy="zero_ext_stage_3", ...)

Lightning publishes one code base under two names, `lightning.pytorch` (with
`lightning.fabric`) and the standalone `pytorch_lightning` (with `lightning_fabric`), whose
classes are distinct: a Trainer of one refuses the other's strategies. Lightning builds the
standalone package by renaming the imports of the unified one; this module does the same with
zero_ext.integrations.lightning, so that both names run one implementation (see that module
for the behaviour). It never imports `lightning`.
"""

import os
import re

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lightning.py")
_RENAMED = (("from lightning.pytorch", "from pytorch_lightning"),
            ("from lightning.fabric", "from lightning_fabric"))


def _load() -> None:
    with open(_SOURCE, encoding="utf-8") as f:
        text = f.read()
    for unified, standalone in _RENAMED:
        text = text.replace(unified, standalone)
    if re.search(r"^\s*(from|import) lightning\b", text, re.MULTILINE):
        # An import written another way would bind this module to the unified package.
        raise ImportError("zero_ext.integrations.pytorch_lightning: lightning.py imports "
                          "`lightning` in a form this module does not rename")
    doc = __doc__
    # Our own source file, its imports renamed (as Lightning makes pytorch_lightning).
    exec(compile(text, _SOURCE, "exec"), globals())  # noqa: S102
    globals()["__doc__"] = doc


_load()
