"""Analysis callbacks (installed as ``overparam.callbacks``)."""
