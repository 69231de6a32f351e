"""Other libraries' ways in. Each module imports its library only when it is itself imported.

- ``syncbn.integrations.lightning``: ``SyncBatchNormPlugin`` for Lightning's ``Trainer``
  (imports lightning);
- ``syncbn.integrations.timm``: timm's BatchNorm + activation layers for
  ``convert_sync_batchnorm`` (never imports timm: it only handles layers timm already built).
"""
