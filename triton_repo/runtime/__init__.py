"""What runs beside tritonserver, locally (`loraship serve`) and in the container: the supervisor that
restarts tritonserver when a model crashes (``supervisor``, with ``processes``: stdlib only) and the
OpenAI-compatible frontend (``openai_frontend``).

Nothing here imports loraship: besides the stdlib (and the frontend's FastAPI, pydantic, httpx and uvicorn)
only the zero-import ``loraship_contract``. `loraship repo --stage-wheels` copies this package whole into
``wheels/`` as ``loraship_runtime``, beside ``loraship_contract.py``, the way `loraship repo` copies the
engine into each model version as ``loraship_engine``; relative imports keep it working under either name.
"""
