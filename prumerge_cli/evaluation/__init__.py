"""Scoring compressed models with lmms-eval, the field's harness: the `prumerge` lmms-eval model, the embedded
world's local tasks, and the runs behind `prumerge eval`. Nothing here imports lmms-eval until it is used."""
