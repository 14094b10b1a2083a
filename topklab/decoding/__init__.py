"""Adapters that plug topklab into Hugging Face transformers models (the only framework-specific code)."""
