"""`dimple serve`: an OpenAI-compatible HTTP server for Dimple that faces careless and hostile clients.

launcher.py (command line, model loading, uvicorn), app.py (routes and OpenAI bodies), requests.py (request checks),
media.py (where pictures may come from), options.py (the operator's limits), decoding.py (the seam to the decoder),
errors.py (OpenAI's error shape). FastAPI and uvicorn come with the `serve` extra and are imported only when serving.
"""

from .launcher import serve

__all__ = ["serve"]
