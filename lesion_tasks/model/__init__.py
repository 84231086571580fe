"""Model: backbones and their weights, cached features, the head (training, MC dropout, calibration),
Grad-CAM, the out-of-scope head and the metrics -- pure modelling, no registry and no database rows.
May import: core."""
