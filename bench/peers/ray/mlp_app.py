"""The Ray Serve application of the peer benchmark: one deployment, `Mlp`, whose replicas hold the model.

Not run by itself: bench/peers/ray/serve.py imports it and passes `build(...)` to `serve.run`.  Each replica
(a Ray actor process, `ray::ServeReplica:peer:Mlp`) loads the 192 MiB Keras MLP once in `__init__` and answers
both routes of the peer contract in `__call__`, told apart by `request.url.path` (a Starlette Request, as in
Serve's own HTTP examples; no FastAPI):

    POST /predict   raw little-endian float32, n × 2048 → the model's output, raw float32 n × 2048,
                    with `X-Worker-Pid: <this replica's pid>`
    POST /square    JSON number → its square, JSON

`batch=True` sends /predict through `@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)` (the issue's
setting), which gathers the rows of concurrent requests into one model call; serve.py then also sets
`max_ongoing_requests=32` so that a replica is sent enough requests to batch (Serve's default is 5).
"""

from __future__ import annotations

import json
import os

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

COLUMNS = 2048
OCTETS = "application/octet-stream"


@serve.deployment
class Mlp:
    """A replica: the model behind a tf.function, built once when the replica starts."""

    def __init__(self, model_path: str, threads: int, batch: bool) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        # The contract: T intra-op threads and 1 inter-op thread per model worker, set before anything is built.
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        import keras

        model = keras.saving.load_model(model_path)

        @tf.function(input_signature=[tf.TensorSpec([None, COLUMNS], tf.float32)])
        def predict(x):
            return model(x, training=False)

        predict(np.zeros((1, COLUMNS), np.float32))  # trace and warm once, with a batch of one
        self._model = model
        self._predict = predict
        self._batch = batch
        self._pid = str(os.getpid())

    def _run(self, rows: np.ndarray) -> np.ndarray:
        return self._predict(rows).numpy()

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _run_batched(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        # One model call for the rows of every request in the batch; each request gets its own rows back.
        out = self._run(np.concatenate(requests))
        return np.split(out, np.cumsum([len(r) for r in requests])[:-1])

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        body = await request.body()
        if path == "/predict":
            rows = np.frombuffer(body, dtype="<f4").reshape(-1, COLUMNS)
            out = await self._run_batched(rows) if self._batch else self._run(rows)
            return Response(out.tobytes(), media_type=OCTETS, headers={"X-Worker-Pid": self._pid})
        if path == "/square":
            n = json.loads(body)
            return Response(json.dumps(n * n), media_type="application/json")
        return Response(b"not found", status_code=404)


def build(model_path: str, threads: int, batch: bool, replicas: int, cpus_per_replica: float):
    """The application serve.run deploys: `replicas` copies of Mlp, batching or not."""
    options: dict = {
        "name": "Mlp",
        "num_replicas": replicas,
        "ray_actor_options": {"num_cpus": cpus_per_replica},
        # SIGHUP's rolling update starts the new replicas before it stops the old ones (Serve's default, 0,
        # stops an old replica first, and with one replica that leaves nothing to answer).
        "max_surge_percent": 100,
    }
    if batch:
        options["max_ongoing_requests"] = 32
    return Mlp.options(**options).bind(model_path, threads, batch)
