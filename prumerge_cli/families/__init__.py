"""One adapter per host class of the families beyond LLaVA-1.5 (LLaVA-NeXT, LLaVA-OneVision, InternVL, Gemma 3):
where each one's score comes from, where the reduction applies, its budget scope, newlines and positions (each
module's docstring answers for its class). `registry.ADAPTERS` maps host class names to adapters; importing this
package alone loads no transformers model code."""
