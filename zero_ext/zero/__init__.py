"""The sharding machinery behind zero_ext's engine: one module per concern (see DESIGN.md)."""

# DeepSpeed's spellings, so that a script's `deepspeed.zero.Init` reads `zero_ext.zero.Init`
# (also `zero_ext.Init`); imported when first asked for, the machinery's modules importing
# one another through this package.
_DEEPSPEED_NAMES = {"Init": "params", "GatheredParameters": "gathered",
                    "register_external_parameter": "params"}


def __getattr__(name: str):
    if name in _DEEPSPEED_NAMES:
        import importlib
        return getattr(importlib.import_module(f"zero_ext.zero.{_DEEPSPEED_NAMES[name]}"), name)
    raise AttributeError(f"module 'zero_ext.zero' has no attribute {name!r}")
