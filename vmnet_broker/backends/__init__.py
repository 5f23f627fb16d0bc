"""Platform backends: what a network and an interface are on each OS.

The broker (policy) talks to a backend through the ``Backend`` protocol in
``base.py``; ``load_backend()`` picks the one for this platform.
"""
