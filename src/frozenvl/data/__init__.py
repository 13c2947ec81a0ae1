"""Data: prompts with image placeholders, chat rendering, datasets and collation."""
