"""`sdlab serve`: an HTTP server for one loaded model.

- `app.create_app(config)` builds the FastAPI application: the A1111-compatible `/sdapi/v1` routes
  (`a1111.py`) and the ControlNet extension's `/controlnet/*` (`a1111_controlnet.py`), the native async jobs API
  `/api/*` (`native.py`), the web UI's static files at `/`;
- `jobs.JobQueue`: a bounded queue and the one worker thread that owns the model (`worker.py` runs a job);
- `store.Store`: jobs and their results in SQLite under the output folder;
- `registry.ModelRegistry`: the checkpoints and LoRAs a client may choose, with A1111's hashes;
- `previews.py`: the per-step latent -> RGB preview; `guard.py`: authentication and body-size limits;
- `inputs.py`: request fields -> `GenerationRequest` (base64 images, limits, sampler / scheduler names).
"""

from sdlab.server.config import Limits, ServerConfig

__all__ = ["Limits", "ServerConfig"]
