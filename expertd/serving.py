"""What the daemon serves now, shared by the master's parts: one object, each field changed in one place.

Every part of the master reads the config in force, the serving generation's
experts and number, whether the daemon is stopping, and the loop's clock.
They hold this one object (passed to their constructors) rather than copies,
so that a reload or a stop is seen by all of them at once.

State owned here, and who changes it:

* ``config``, ``experts``, ``generation``: :mod:`expertd.reloads` (a new
  generation loaded, or a failed one undone), and :meth:`expertd.admin.Admin.scale`
  for ``config.workers``;
* ``stopping``: :mod:`expertd.master` (the stop begins);
* ``requests_served``: :mod:`expertd.dispatch` (each DONE report);
* ``access``: derived from ``config``, rebuilt when a reload replaces it;
* ``now``: the master's loop, once per iteration, after ``epoll`` returns.  Decisions
  within an iteration share that reading (a deadline a few microseconds late is
  nothing; a clock read per decision cost the hand-over path eight readings a request).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from expertd.access import Access
from expertd.config import Config


@dataclass(eq=False)
class Serving:
    config: Config
    experts: dict[str, dict] = field(default_factory=dict)  # name -> description, from the generation's parent
    generation: int = 1
    stopping: bool = False
    now: float = field(default_factory=time.monotonic)
    requests_served: int = 0  # reported by workers in their DONE reports
    started_at: float = field(default_factory=time.time)
    _access: tuple[Config, Access] | None = None

    def access(self) -> Access:
        """Who may connect, control and read status, by the config in force (reloads change it)."""
        if self._access is None or self._access[0] is not self.config:
            self._access = (self.config, Access(self.config))
        return self._access[1]

    def tick(self) -> float:
        """Read the clock for this loop iteration."""
        self.now = now = time.monotonic()
        return now
