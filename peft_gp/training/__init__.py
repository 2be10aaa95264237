"""Layer 3: the training lifecycle (``GPCallback`` for any ``Trainer``, and ``GPTrainer``)."""
