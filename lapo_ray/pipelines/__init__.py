"""The pipelines: one module per job that chains the rooms below it (pretrain, label, sweep,
experiment), each read top to bottom as a list of named steps."""
