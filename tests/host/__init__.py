"""A stranger's Lightning project, written the way many are, for testing gnlightning from the outside.

Nothing here imports gnlightning: these are the host's own modules. ``host_classes(namespace)`` builds them on
``lightning.pytorch`` or on the standalone ``pytorch_lightning`` (a Trainer accepts only LightningModules of its own
namespace), so each test can run both.
"""
