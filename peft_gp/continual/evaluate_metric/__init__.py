"""The ``evaluate`` metric script (loaded by path, see ``peft_gp.continual.EVALUATE_METRIC_PATH``)."""
