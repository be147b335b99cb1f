"""Integrations with the transformers Trainer and PEFT."""
