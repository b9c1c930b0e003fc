"""The sharding machinery behind zero_ext's engine: one module per concern (see DESIGN.md)."""
