"""Constants shared across frozenvl; this module imports nothing, so any module can use it cheaply."""

# Placeholder id written into input_ids where vision tokens go (LLaVA's convention: a negative id
# that never collides with the vocabulary, so the base tokenizer and embedding table stay untouched).
IMAGE_TOKEN_ID = -200

# The base LLM's own workflow: no family module, no images.
TEXT_TASK = "text"
