"""Sites: the clinics, hospitals or collections images come from. A site's status (`status`), its validation
sample (`sample`), its threshold and calibration (`thresholds`) and what a night says about it (`nights`).
May import: core, ingest, model, data, versions."""
