"""The HTTP face of lcmq (`lcmq api`): a FastAPI app over the Python API (lcmq.api).

It parses, authenticates and calls lcmq.api; it holds no logic of its own, so the CLI and HTTP
give the same answers. Modules: app (the factory, error mapping), auth (keys and the session
cookie), routes (the /v1 JSON API), events (server-sent events), dashboard (HTML pages),
metrics (/metrics), server (uvicorn and the background loops).
"""
