"""The Lightning face of gnlightning: callbacks and the LayerSync plugin.

Built on ``lightning.pytorch``; every class here is also accepted by a ``pytorch_lightning`` Trainer (see
``compat.py``)."""
