"""Fine-tuning Chroma as the paper trains it: frozen Reasoner as feature extractor, Backbone and Decoder trained.

* :mod:`.sequence` — the backbone's teacher-forced input for a response (the inference sequence) and the
  differentiable full-sequence forwards;
* :mod:`.data` — the JSONL manifest and the prepared (safetensors-sharded) dataset;
* :mod:`.prepare` — ``openchroma prepare``: Mimi codes and reasoner features, once;
* :mod:`.train` — LoRA or full fine-tuning, one process or many (DDP, FSDP); ``openchroma train`` is
  :mod:`.train_cli`, training checkpoints and the output checkpoint :mod:`.checkpoints`;
* :mod:`.synth` — ``openchroma synth``: the paper's two-stage synthetic-data pipeline.
"""
