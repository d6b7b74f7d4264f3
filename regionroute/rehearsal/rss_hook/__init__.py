"""The rehearsal's peak-RSS hook: this directory goes first on PYTHONPATH so that ``sitecustomize`` loads."""
