"""The gunicorn peer's WSGI app, run by gunicorn's gthread HTTP workers (``http_app:application``).

Routes (the peer contract of bench/peers.py):

- ``POST /predict``: raw float32 rows (n × 2048) in, the model's rows out; the rows go to a dirty worker through the
  dirty client's ``execute()`` (one thread-local client per HTTP worker thread, as gunicorn's docs show) and the reply
  carries ``X-Worker-Pid``, the pid of the dirty worker that ran the model.
- ``POST /square``: JSON number in, its square out, answered here in the HTTP worker (no dirty hop).
- ``POST /square-dirty``: the same, answered by a dirty worker (one hop through the dirty arbiter).

It imports neither TensorFlow nor numpy: the model lives only in the dirty workers (model_app.py).
"""

import json

from gunicorn.dirty import get_dirty_client

MODEL_APP = "model_app:ModelApp"


def _reply(start_response, status, body, content_type, headers=()):
    start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body))), *headers])
    return [body]


def application(environ, start_response):
    """Answer one request; errors become a 500 with the exception's text."""
    path = environ.get("PATH_INFO", "")
    if environ.get("REQUEST_METHOD") != "POST" or path not in ("/predict", "/square", "/square-dirty"):
        return _reply(start_response, "404 Not Found", b"not found\n", "text/plain")
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    try:
        if path == "/predict":
            result = get_dirty_client().execute(MODEL_APP, "predict", body)
            return _reply(start_response, "200 OK", result["y"], "application/octet-stream",
                          [("X-Worker-Pid", str(result["pid"]))])
        x = json.loads(body)
        y = x * x if path == "/square" else get_dirty_client().execute(MODEL_APP, "square", x)
        return _reply(start_response, "200 OK", json.dumps(y).encode(), "application/json")
    except Exception as error:
        return _reply(start_response, "500 Internal Server Error", f"{type(error).__name__}: {error}\n".encode(),
                      "text/plain")
