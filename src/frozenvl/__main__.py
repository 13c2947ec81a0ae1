"""`python -m frozenvl ...` (what torchrun and `accelerate launch -m` need)."""

from .cli import app

app()
