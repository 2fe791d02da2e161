"""Training: the LightningModule around a timm backbone, the two-phase callback, and what keeps a run exact
(seeding, DDP sharding, crash-safe checkpoints and logs, offline pretrained weights, stain normalisation)."""
