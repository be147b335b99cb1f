"""Converters: dense → MoE upcycling (Llama, Mistral, Qwen2, Qwen3) and MoE format import/export."""
