"""zero_ext.integrations: zero_ext under other libraries' training loops.

``zero_ext.integrations.transformers.ZeroTrainer`` runs the Hugging Face ``Trainer`` on a
zero_ext engine. Each integration is its own submodule, imported on demand, so that importing
zero_ext never imports the library it integrates with.
"""
