"""Training data: which labelled images train, validate and test (`splits`, frozen per lesion), and with which
label (`trainset`: the one training-label policy, reviewer verdicts, out-of-scope images, sample weights).
May import: core, ingest, model."""
