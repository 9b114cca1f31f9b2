"""The gunicorn peer's dirty app: the model, loaded once in each gunicorn dirty worker.

gunicorn's dirty arbiter imports this module (``--dirty-app model_app:ModelApp``, with ``--pythonpath`` set to this
folder by serve.py) and, in every dirty worker it forks, instantiates ``ModelApp`` and calls its ``init()``: that is
where the model is built, as gunicorn's docs recommend (https://gunicorn.org/dirty). The HTTP workers (http_app.py)
reach it through ``get_dirty_client().execute("model_app:ModelApp", action, ...)``.

TensorFlow is imported inside ``init()``, not at the top of the module: gunicorn's master and dirty arbiter import
this module too (to read the ``workers`` class attribute), and neither should hold TensorFlow nor fork with it loaded.

Settings come from the environment serve.py gives gunicorn: ``PEER_MODEL`` (absolute path of mlp192.keras) and
``PEER_TF_THREADS`` (TensorFlow intra-op threads per dirty worker; inter-op is 1).
"""

import os

from gunicorn.dirty import DirtyApp

WIDTH = 2048


class ModelApp(DirtyApp):
    """The 192 MiB Keras MLP in a ``tf.function``; ``predict`` takes and gives raw little-endian float32 rows."""

    def init(self):
        import keras
        import numpy as np
        import tensorflow as tf

        threads = int(os.environ.get("PEER_TF_THREADS", "1"))
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        model = keras.saving.load_model(os.environ["PEER_MODEL"])
        self._function = tf.function(lambda x: model(x, training=False),
                                     input_signature=[tf.TensorSpec([None, WIDTH], tf.float32)])
        self._function(np.zeros((1, WIDTH), np.float32))  # warm: trace and run once with a batch of 1
        self._np = np
        self._pid = os.getpid()

    def predict(self, body):
        """Rows in (n × 2048 float32 bytes), rows out, with the pid of this dirty worker for X-Worker-Pid."""
        x = self._np.frombuffer(body, dtype="<f4").reshape(-1, WIDTH)
        return {"pid": self._pid, "y": self._function(x).numpy().tobytes()}

    def square(self, x):
        """The trivial function, for /square-dirty: what one hop through the dirty arbiter costs."""
        return x * x
