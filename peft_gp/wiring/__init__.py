"""Layer 2: how gradient projection attaches to PEFT models (configs, tuners, memory, projection, persistence)."""
