"""Document experts for tests/test_pipeline_faces.py: ones that take their worker down."""

import os
import signal


def reaper(document):
    """Kills its worker when the document says ``die``, or says ``die_once`` (a path) and that file is not there
    yet (it is made first: the request sent again is answered); else the document's length."""
    once = document.get("die_once")
    if document.get("die") or (once and not os.path.exists(once)):
        if once:
            open(once, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return len(document.get("text", ""))
