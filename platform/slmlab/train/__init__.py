"""One training loop for every family (``loop.py``), launched on Ray Train (``launch.py``)."""
