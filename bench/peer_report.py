"""The peers section of BENCHMARKS.md and its two plots, from bench/peers.py's results (a JSON dict).

Figures are medians over the rounds; every comparison is between figures measured in the same run.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import sections

PEERS = ["gunicorn", "ray", "ray-haproxy", "ray-batch", "ray-haproxy-batch", "ray-haproxy-batch-1x2"]
RAY_BATCHED = ["ray-batch", "ray-haproxy-batch"]  # (2 replicas of one thread: like expertd's 2 workers)
EXPERTD = ["expertd", "expertd-batching", "expertd-batching-1x2"]
TRANSPORTS = ("http", "json", "socket")  # (peers: http only, raw rows; expertd: raw rows, JSON, its client)
HOW = {"http": "HTTP, raw rows", "json": "HTTP, JSON", "socket": "its client on the Unix socket"}


def _med(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}{unit}"


class Figures:
    """Medians over the rounds of one run's results."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.keys = [k for k in data["systems"]]

    def load(self, key: str, transport: str, clients: int, figure: str) -> float | None:
        return _med([r[key][transport].get(str(clients), {}).get(figure) for r in self.data["rounds"]
                     if key in r and r[key].get(transport)])

    def has(self, key: str, transport: str) -> bool:
        return any(r.get(key, {}).get(transport) for r in self.data["rounds"])

    def value(self, key: str, *path: str) -> float | None:
        values = []
        for r in self.data["rounds"]:
            node = r.get(key)
            for step in path:
                node = node.get(step) if isinstance(node, dict) else None
            values.append(node)
        return _med(values)

    def worker_memory(self, key: str, figure: str) -> float | None:
        return _med([_med([w[figure] for w in r[key]["memory"]["workers"]]) for r in self.data["rounds"]
                     if key in r and r[key]["memory"]["workers"]])

    def errors(self) -> dict[str, list[int]]:
        """Per system, [calls, failed calls] over every load of the run: model, trivial function, memory."""
        out: dict[str, list[int]] = {}
        for r in self.data["rounds"]:
            for key, result in r.items():
                loads = [*result.get("http", {}).values(), *result.get("json", {}).values(),
                         *result.get("socket", {}).values(),
                         *result.get("square", {}).values()]
                tally = out.setdefault(key, [0, 0])
                tally[0] += sum(load["calls"] for load in loads)
                tally[1] += sum(load["errors"] for load in loads)
        for key, by in self.data.get("memory", {}).items():
            tally = out.setdefault(key, [0, 0])
            for m in by.values():
                tally[0] += m.get("calls", 0)
                tally[1] += m.get("errors", 0)
        return out

    def mismatches(self) -> tuple[float, int]:
        worst, bad = 0.0, 0
        for r in self.data["rounds"]:
            for result in r.values():
                for transport in TRANSPORTS:
                    for load in result.get(transport, {}).values():
                        worst = max(worst, load.get("max_diff", 0.0))
                        bad += load.get("mismatched", 0)
        return worst, bad


def targets(f: Figures) -> list[tuple[str, str, bool | None]]:
    data, out = f.data, []
    memory = data.get("memory", {})
    ours = memory.get("expertd-batching", {}).get("4", {}).get("total_pss")
    theirs = {k: memory[k]["1"]["total_pss"] for k in ("gunicorn", "ray", "ray-haproxy")
              if k in memory and "1" in memory[k]}
    if ours is not None and theirs:
        best = min(theirs, key=theirs.get)
        out.append(("expertd with 4 model workers: less total memory (PSS, every process) than either peer with 1",
                    f"{ours:,.0f} MiB vs {data['systems'].get(best, best)} {theirs[best]:,.0f} MiB (the least of "
                    + ", ".join(f"{data['systems'].get(k, k)} {v:,.0f}" for k, v in theirs.items()) + ")",
                    ours < theirs[best]))
    peer_p50 = {k: f.load(k, "http", 1, "p50_ms") for k in PEERS if k in f.keys}
    peer_p50 = {k: v for k, v in peer_p50.items() if v is not None}
    if peer_p50 and "expertd-batching" in f.keys:
        best = min(peer_p50, key=peer_p50.get)
        ours = f.load("expertd-batching", "http", 1, "p50_ms")
        out.append(("batch-1 latency over HTTP (p50, one caller) at most the best peer's",
                    f"expertd {_fmt(ours, 2)} ms vs {data['systems'][best]} {_fmt(peer_p50[best], 2)} ms",
                    None if ours is None else ours <= peer_p50[best]))
    ray = {k: f.load(k, "http", 16, "items_s") for k in RAY_BATCHED if k in f.keys}
    ray = {k: v for k, v in ray.items() if v is not None}
    for transport, how in (("socket", "expertd's client on its socket"), ("http", "HTTP with raw rows"),
                           ("json", "HTTP with JSON")):
        # Like for like: 2 model workers of one thread, as every peer; one worker of two threads beside it.
        ours = f.load("expertd-batching", transport, 16, "items_s")
        if not ray or ours is None:
            continue
        best = max(ray, key=ray.get)
        wide = f.load("expertd-batching-1x2", transport, 16, "items_s")
        ray_wide = f.load("ray-haproxy-batch-1x2", "http", 16, "items_s")
        out.append((f"16 single-row callers, {how}: items/s at least 3× Ray Serve's best batched (2 workers each)",
                    f"expertd {_fmt(ours)} vs 3 × {data['systems'][best]} {_fmt(ray[best])} = {_fmt(3 * ray[best])} "
                    f"({ours / ray[best]:.1f}×)", ours >= 3 * ray[best]))
        if wide and ray_wide:
            out.append((f"the same, one model worker of two threads each, {how}",
                        f"expertd {_fmt(wide)} vs 3 × Ray Serve, HAProxy mode + @serve.batch, 1 replica × 2 threads "
                        f"{_fmt(ray_wide)} = {_fmt(3 * ray_wide)} ({wide / ray_wide:.1f}×)", wide >= 3 * ray_wide))
    worst, bad = f.mismatches()
    out.append(("every model reply matches the model's output (numpy, from the generator's weights)",
                f"largest difference {worst:.1e}; {bad} mismatched", bad == 0))
    tallies = f.errors()
    ours = [tallies[k] for k in EXPERTD if k in tallies]
    if ours:
        calls, errors = sum(t[0] for t in ours), sum(t[1] for t in ours)
        peers = "; ".join(f"{data['systems'].get(k, k)} {t[1]:,} of {t[0]:,}" for k, t in tallies.items()
                          if k not in EXPERTD and t[1])
        out.append(("no call to expertd failed (outside reloads: their failures are in the reload column)",
                    f"{errors:,} failed of {calls:,}" + (f" (failed calls to the peers: {peers})" if peers
                                                         else " (none failed on the peers either)"),
                    errors == 0))
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")


def markdown(data: dict) -> str:
    f = Figures(data)
    cfg, names, v = data["config"], data["systems"], data["versions"]
    clients = cfg["clients"]
    out = ["## Model servers: expertd, gunicorn's dirty arbiters and Ray Serve", "",
           f"Generated by `make bench-peers` (bench/peers.py) on {data['started']} in {data['seconds'] / 60:.0f} "
           f"minutes{' (--quick)' if data.get('quick') else ''}: {cfg['rounds']} round(s), the systems one after "
           "the other in each; medians over the rounds. Read the ratios: this machine is shared and noisy, and "
           "every figure compared here was measured in the same run.", "",
           f"- machine: {data['machine']['nproc']} cores, {data['machine']['memory_gib']:.0f} GiB "
           f"({data['machine']['platform']}); Python {v['python']}; expertd at {v['expertd']}",
           f"- expertd: tensorflow-cpu {v.get('tensorflow-cpu')}, ai-edge-litert {v.get('ai-edge-litert')}, "
           f"orjson {v.get('orjson')}; peers in their own venvs (bench/peers/*/requirements.txt, pinned): "
           + ", ".join(f"{k.split(':')[1]} {val}" for k, val in v.items() if ":" in k),
           "- the model: bench/models/mlp192.keras (bench/make_mlp.py), 192 MiB of float32 weights, 2048 → 4096 → "
           "4096 → 4096 → 2048; every server: 2 model workers (unless said), one TensorFlow thread each",
           "- expertd: a model expert (`model = PATH`, no code; LiteRT, one copy of the weights shared by all "
           "workers), batching off (`max_batch = 1`) or on (the default); over HTTP `POST /call/mlp` with the "
           "row as 8 KiB of raw float32 (`Content-Type: application/octet-stream`, as the peers take it) or as "
           "JSON (`{\"inputs\": [row]}`, 42 KB), or `Client.predict` on its Unix socket (msgpack, raw bytes)",
           "- gunicorn 27 dirty arbiters (bench/peers/gunicorn/) and Ray Serve (bench/peers/ray/): Keras in a "
           "`tf.function` in each model worker, rows posted as 8 KiB of raw float32 (`POST /predict`), the "
           "cheapest body they can take",
           f"- callers (bench/peer_load.py): processes with one kept-alive connection each, closed loop, "
           f"{cfg['seconds']:g} s windows shared by all callers, on the same 2 cores as the server", ""]
    out += ["### Targets", "", "| target | measured | |", "| --- | --- | --- |"]
    out += [f"| {what} | {measured} | {verdict(ok)} |" for what, measured, ok in targets(f)]
    out += ["", "### 2 model workers", "",
            "Batch-1 latency: one caller's sequential calls. Items/s: rows answered per second with that many "
            "concurrent single-row callers. Memory: after the callers, each model worker's USS / PSS / RSS "
            "(median over the workers), and the PSS of every process of the server summed (their count in "
            "brackets). Start: from the server's process start to its first model answer. Reload: from the "
            "reload signal (SIGHUP) to the first answer from a new model worker, with a caller calling "
            "throughout (failed calls in brackets).", "",
            "| server | batch-1 p50 / p99 ms | items/s: " + " / ".join(f"{c}" for c in clients)
            + " callers | model worker USS / PSS / RSS MiB | server PSS MiB (processes) | start → first answer s "
              "| reload → first answer s (failed) |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    keras = data.get("keras") or []
    if keras:
        out.append(f"| Keras `tf.function` in one process, no server | {_fmt(_med([k['p50_ms'] for k in keras]), 2)} / "
                   f"{_fmt(_med([k['p99_ms'] for k in keras]), 2)} | | {_fmt(_med([k['uss'] for k in keras]), 0)} / "
                   f"{_fmt(_med([k['pss'] for k in keras]), 0)} / {_fmt(_med([k['rss'] for k in keras]), 0)} | | | |")
    for key in f.keys:
        for transport in TRANSPORTS:
            if not f.has(key, transport):
                continue
            label = names[key] + (f", {HOW[transport]}" if key in EXPERTD else "")
            latency = f"{_fmt(f.load(key, transport, 1, 'p50_ms'), 2)} / {_fmt(f.load(key, transport, 1, 'p99_ms'), 2)}"
            items = " / ".join(_fmt(f.load(key, transport, c, "items_s")) for c in clients)
            if transport != "http":
                out.append(f"| {label} | {latency} | {items} | (as above) | | | |")
                continue
            memory = (f"{_fmt(f.worker_memory(key, 'uss'), 0)} / {_fmt(f.worker_memory(key, 'pss'), 0)} / "
                      f"{_fmt(f.worker_memory(key, 'rss'), 0)}")
            server = f"{_fmt(f.value(key, 'memory', 'total_pss'), 0)} ({_fmt(f.value(key, 'memory', 'processes'), 0)})"
            reload = _reload(f, key)
            out.append(f"| {label} | {latency} | {items} | {memory} | {server} | "
                       f"{_fmt(f.value(key, 'first_answer_s'), 1)} | {reload} |")
    if data.get("expertd_cold_start_s") is not None:
        out += ["", f"expertd's start figures are warm: its model cache already held the model prepared for LiteRT. "
                    f"The run's first start, with an empty cache (the model converted in a child process, once per "
                    f"model file and machine), took {data['expertd_cold_start_s']:.1f} s to its first answer."]
    out += ["", "![items/s by concurrent callers](bench/plots/peers_items_by_clients.png)", "",
            "### The trivial function over HTTP", "",
            "One caller, sequential calls on a kept-alive connection, `square(7)`; 2 workers. For expertd, "
            "`POST /call/square` with `[7]`; for the peers, `POST /square` with `7` answered in the HTTP worker "
            "(gunicorn) or by a replica (Ray), and for gunicorn also through a dirty worker (`POST /square-dirty`). "
            "The Firefly and gunicorn rows of section 2 above were measured in another run.", "",
            "| server | route | p50 µs | p99 µs | calls/s |", "| --- | --- | --- | --- | --- |"]
    routes = {"square-socket": "`Client.call` on the Unix socket (msgpack)", "square-json": "`POST /call/square`",
              "square-raw": "`POST /square`",
              "square-dirty": "`POST /square-dirty` (through a dirty worker)"}
    for key in f.keys:
        for kind in routes:
            p50 = _med([r[key]["square"][kind]["p50_ms"] for r in data["rounds"]
                        if kind in r.get(key, {}).get("square", {})])
            if p50 is None:
                continue
            p99 = _med([r[key]["square"][kind]["p99_ms"] for r in data["rounds"] if kind in r[key]["square"]])
            rate = _med([r[key]["square"][kind]["items_s"] for r in data["rounds"] if kind in r[key]["square"]])
            out.append(f"| {names[key]} | {routes[kind]} | {p50 * 1000:,.0f} | {p99 * 1000:,.0f} | {rate:,.0f} |")
    memory = data.get("memory", {})
    if memory:
        counts = sorted({int(n) for m in memory.values() for n in m})
        out += ["", "### Memory by model workers", "",
                "One start per count; each model worker made to run the model (2 callers per worker for 2 s), then "
                "every process of the server weighed: PSS summed (MiB), with each model worker's USS in brackets "
                "(median), and start to first answer.", "",
                "| server | " + " | ".join(f"{n} model worker{'s' if n > 1 else ''}" for n in counts)
                + " | start → first answer s (" + ", ".join(map(str, counts)) + ") |",
                "| --- | " + " | ".join("---" for _ in counts) + " | --- |"]
        for key, by in memory.items():
            cells = []
            for n in counts:
                m = by.get(str(n))
                cells.append("n/a" if m is None else
                             f"{m['total_pss']:,.0f} ({_fmt(_med([w['uss'] for w in m['workers']]), 0)}; "
                             f"{m['processes']} processes"
                             + ("" if m.get("warm", True) else "; not every worker had answered") + ")")
            starts = ", ".join(_fmt(by[str(n)]["first_answer_s"], 1) for n in counts if str(n) in by)
            out.append(f"| {names.get(key, key)} | " + " | ".join(cells) + f" | {starts} |")
        out += ["", "![total memory by model workers](bench/plots/peers_memory_by_workers.png)"]
    out += ["", "### Reading", "", *reading(f)]
    return "\n".join(out) + "\n"


def _reload(f: Figures, key: str) -> str:
    if f.value(key, "reload", "calls") is None:
        return "n/a"
    failed = _fmt(f.value(key, "reload", "failed"), 0)
    seconds = f.value(key, "reload", "seconds")
    if seconds is None:  # (no new worker answered within the wait: the reload broke the server)
        return f"**none answered** ({failed} failed)"
    return f"{seconds:.2f} ({failed})"


def reading(f: Figures) -> list[str]:
    """What the figures say, where expertd leads and where it does not, and why (from this run's figures)."""
    data, names, out = f.data, f.data["systems"], []
    memory = data.get("memory", {})
    e4 = memory.get("expertd-batching", {}).get("4", {})
    g4 = memory.get("gunicorn", {}).get("4", {})
    if e4 and g4:
        out.append(f"- **Memory.** expertd's model workers share one copy of the weights: the model prepared "
                   f"once for LiteRT, its weights in a file every worker maps (XNNPACK's weight cache), so a model "
                   f"worker costs about {_fmt(_med([w['uss'] for w in e4['workers']]), 0)} MiB of its own and four "
                   f"of them, with the master, {e4['total_pss']:,.0f} MiB in all. Each peer's model worker holds "
                   f"its own Keras copy of the weights and TensorFlow's heap "
                   f"({_fmt(_med([w['uss'] for w in g4['workers']]), 0)} MiB USS in each of 4 gunicorn dirty "
                   "workers), "
                   "so their memory grows by that much per worker, and Ray adds its cluster (GCS, raylet, "
                   "dashboard agents, controller, proxy) before the first replica.")
    for key in ("expertd-batching",):
        ours = f.load(key, "http", 1, "p50_ms")
        socket = f.load(key, "socket", 1, "p50_ms")
        json_p50 = f.load(key, "json", 1, "p50_ms")
        keras = _med([k["p50_ms"] for k in data.get("keras") or []])
        peers = {k: f.load(k, "http", 1, "p50_ms") for k in PEERS if k in f.keys}
        peers = {k: v for k, v in peers.items() if v is not None}
        if ours is not None and peers and keras is not None:
            best = min(peers, key=peers.get)
            lead = "leads" if ours <= peers[best] else "does not lead"
            out.append(f"- **Latency at batch 1.** Keras alone takes {keras:.2f} ms a row here; expertd answers "
                       f"in {ours:.2f} ms over HTTP with raw rows, {_fmt(json_p50, 2)} ms with JSON and "
                       f"{_fmt(socket, 2)} ms with its client, the best "
                       f"peer ({names[best]}) in {peers[best]:.2f} ms: expertd {lead}. The runtimes differ: expertd "
                       "runs the model with LiteRT (XNNPACK), the peers with Keras on TensorFlow, and in one process "
                       "LiteRT takes less time than Keras at batch 1 (BENCHMARKS-models.md measures it), so part "
                       "of the difference is the runtime, which a peer's user could adopt by hand (with one copy "
                       "of the weights per worker). The servers' own cost per call is the trivial function's table.")
    ours16 = {k: (f.load(k, "http", 16, "items_s"), f.load(k, "socket", 16, "items_s")) for k in EXPERTD
              if k in f.keys}
    ray = {k: f.load(k, "http", 16, "items_s") for k in RAY_BATCHED if k in f.keys}
    ray = {k: v for k, v in ray.items() if v is not None}
    if ours16 and ray:
        best = max(ray, key=ray.get)
        told = "; ".join(f"{names[k]} {_fmt(http)} over HTTP" + (f", {_fmt(sock)} with its client" if sock else "")
                         for k, (http, sock) in ours16.items())
        ray_wide = f.load("ray-haproxy-batch-1x2", "http", 16, "items_s")
        if ray_wide is not None:
            told += f"; {names['ray-haproxy-batch-1x2']} {ray_wide:,.0f}"
        out.append(f"- **Throughput.** With 16 single-row callers: {told}; {names[best]} {ray[best]:,.0f}. Batches "
                   "form in expertd's master from every connection, with no proxy hop per row; Ray's form inside "
                   "each replica behind its proxy, so each row still pays the proxy's and the replica's "
                   "per-request Python on the same two cores. gunicorn's dirty arbiters do not batch: each row is "
                   "one model call." + (
                       " This model is bound by memory at small batches (each batch streams the 192 MiB of weights "
                       "once), so one model worker with two threads, which takes all 16 rows in one batch, served "
                       "more rows than two workers of one thread taking 8 each."
                       if (ours16.get("expertd-batching-1x2", (None, None))[1] or 0)
                       > (ours16.get("expertd-batching", (None, None))[1] or 0) else ""))
    told = []
    for key in f.keys:
        if f.value(key, "reload", "calls") is None:
            continue
        seconds, failed = f.value(key, "reload", "seconds"), f.value(key, "reload", "failed") or 0
        told.append(f"{names[key]} " + (f"never ({failed:,.0f} calls failed)" if seconds is None
                                        else f"{seconds:.1f} s ({failed:,.0f} failed)"))
    if told:
        broken = "gunicorn" in f.keys and f.value("gunicorn", "reload", "seconds") is None
        out.append("- **Reload** (SIGHUP, a caller calling throughout, to the first answer from a new model "
                   "worker): " + "; ".join(told) + "." + (
                       " gunicorn 27.0.1's dirty arbiter, told to reload, can stop its new workers while they load "
                       "the model, and then serves no model call again until restarted: a race, which some runs "
                       "lose (bench/peers/gunicorn/serve.py's docstring traces it in gunicorn's source)."
                       if broken else ""))
    raw16, json16 = f.load("expertd-batching", "http", 16, "items_s"), f.load("expertd-batching", "json", 16, "items_s")
    if raw16 and json16:
        out.append(f"- **Where expertd does not lead, or not by much.** JSON costs: with 16 callers expertd serves "
                   f"{json16:,.0f} rows/s when they send JSON against {raw16:,.0f} as raw bytes. A row is 42 KB "
                   "of text and its answer 40 KB; orjson brought the worker's share from 3.1 to 0.4 ms a row "
                   "(measured alone, docs/http.md), but the master frames 42 KB requests and the caller writes "
                   "and reads the text too, on the same two cores. A cold first start converts the model for "
                   "LiteRT, which the peers never do (see above); later starts load the converted model. The "
                   "peers can run any Python around the model in the request; expertd's model experts serve a "
                   "model with no code (a Python expert can wrap `expertd.Model` for pre- and post-processing).")
    return out or ["(not enough systems in this run for a reading)"]


def plots(data: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, names, written = Figures(data), data["systems"], []
    directory.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    clients = data["config"]["clients"]
    for key in f.keys:
        for transport, style in (("http", "-o"), ("json", ":^"), ("socket", "--s")):
            if f.has(key, transport):
                points = [(c, f.load(key, transport, c, "items_s")) for c in clients]
                points = [(c, y) for c, y in points if y is not None]
                ax.plot([c for c, _ in points], [y for _, y in points], style,
                        label=names[key] + (f" ({HOW[transport]})" if key in EXPERTD else ""))
    ax.set_xlabel("concurrent single-row callers")
    ax.set_ylabel("rows answered per second")
    ax.set_xticks(clients)
    ax.set_title("192 MiB MLP on 2 cores: 2 model workers unless said")
    written.append(_save(fig, ax, directory / "peers_items_by_clients.png"))
    memory = data.get("memory", {})
    if memory:
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for key, by in memory.items():
            counts = sorted(int(n) for n in by)
            ax.plot(counts, [by[str(n)]["total_pss"] for n in counts], "-o", label=names.get(key, key))
        ax.set_xlabel("model workers")
        ax.set_ylabel("server's memory, PSS of every process (MiB)")
        ax.set_xticks(sorted({int(n) for by in memory.values() for n in by}))
        ax.set_ylim(bottom=0)
        ax.set_title("192 MiB MLP: total memory by model workers")
        written.append(_save(fig, ax, directory / "peers_memory_by_workers.png"))
    return written


def _save(fig, ax, path: Path) -> Path:
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(data: dict, report: Path, plot_dir: Path) -> None:
    plots(data, plot_dir)
    sections.replace(report, "peers", "bench/peers.py (make bench-peers)", markdown(data))
