"""The web audit console (``outbox-relay web``): auditors find any action and read its timeline,
operators see the overview and redrive dead letters. Optional: ``pip install 'outbox-relay[web]'``."""
