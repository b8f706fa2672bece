"""PruMerge's own regime: LLaVA's instruction tuning re-run with a token reducer active, LoRA on the LM and
the projector trained in full (`../shared/specs/prumerge.md` §6)."""
