"""Per-paradigm handlers: which parameters are projected and which activations feed each basis.

Each handler module has one function ``(model, adapter_name, config) -> list[ProjectedGroup]``; ``wiring.state``
maps PEFT types to them (adding a paradigm costs one module and one entry there).
"""
