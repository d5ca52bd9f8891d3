"""First-party task plugins (installed as ``overparam.plugins``)."""
