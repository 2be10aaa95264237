"""Layer 1: pure functions importing nothing of peft_gp outside core (maths, sketch, metrics, files, PEFT helpers)."""
