"""Layer 1: pure functions that import nothing else of peft_gp (maths, metrics, files, PEFT model helpers)."""
