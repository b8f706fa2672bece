"""Converters from upstream checkpoint layouts to Hugging Face LLaVA directories and prumerge bundles."""
