"""gnl-train's own config tree (``train.yaml`` and its groups), the primary config path of gnl-train and gnl-inspect.

Not meant for other apps' search paths: its groups (``trainer``, ``callbacks``, ``model`` ...) have the names every
Hydra project uses, and would mix into theirs. Other apps add ``pkg://gnlightning.conf`` instead.
"""
