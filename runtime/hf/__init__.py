"""Hugging Face integration: loading the model, its processors and inputs, and Spava attention
behind transformers' attention interface."""
