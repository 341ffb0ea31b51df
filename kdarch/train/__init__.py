"""kdarch.train: the train script's machinery — tokenizers and datasets, run configs, the training loop,
checkpoints with exact resume, the distillation objective, the reasoning task, evaluation and reports.
The model and `kdarch.distill` never import it.

- `tokenizer.py` / `data.py`: byte and BPE tokenizers; documents, held-out split, packing, resumable batches.
- `config.py`: the TOML run configuration and its `--section.field` flags.
- `loop.py`: `train(model, cfg, tokens, run_dir, objective=...)`; `objective.py`: `LMObjective`, `DistillObjective`;
  `device.py`: devices and peak memory; `metrics.py`: metrics files and the progress bar; `interrupt.py`: Ctrl-C.
- `checkpoint.py`: atomic safetensors + JSON checkpoints, exact resume.
- `pipeline.py`: `kdarch train` / `kdarch distill` runs; `reasoning.py`: `kdarch distill --task arithmetic`;
  `evaluate.py` / `report.py`: the measurements and report.json / report.md / plots.
"""
from kdarch.train.config import RunConfig, load_run_config
from kdarch.train.data import Batches, embedded_corpus, load_documents, pack, split_documents
from kdarch.train.loop import TrainingError, train
from kdarch.train.objective import DistillObjective, LMObjective, StepLoss
from kdarch.train.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = ["BPETokenizer", "Batches", "ByteTokenizer", "DistillObjective", "LMObjective", "RunConfig", "StepLoss",
           "Tokenizer", "TrainingError", "embedded_corpus", "load_documents", "load_run_config", "load_tokenizer",
           "pack", "split_documents", "train"]
