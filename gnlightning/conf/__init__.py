"""The config groups gnlightning offers to other Hydra apps: add ``pkg://gnlightning.conf`` to the search path of the
app's primary config and write ``+norm_swap=gn_ws``.

Only groups no host is likely to have live here (``norm_swap``), so that the search path changes nothing a host
composes from its own options. gnl-train's config tree is the separate package ``gnlightning.train_conf``.
"""
