"""kdarch.train: the train script's machinery — tokenizers and datasets, the training loop, checkpoints with
exact resume, the reasoning task, reports. The model and `kdarch.distill` never import it."""
