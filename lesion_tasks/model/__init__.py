"""Model: backbones and their weights, cached features, the head (training, MC dropout, calibration),
Grad-CAM, the out-of-scope head, the metrics and the training configuration (`config`: `TrainConfig`, the
gate's floors, the knobs of the form and the CLI) -- pure modelling, no registry and no database rows.
May import: core."""
