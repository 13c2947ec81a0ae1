"""`frozenvl serve`: an OpenAI-compatible HTTP server over one frozen base and its workflows.

`engine.Engine` owns the model (one worker thread, a bounded queue, batches per workflow);
`app.create_app` is the FastAPI app on top of it; `media` turns `image_url` parts into images
under the limits in `limits.Limits`. Needs the `serve` extra (fastapi, uvicorn); see docs/serve.md.
"""

from .limits import Limits

__all__ = ["Limits"]
