"""Load test of ``colengine serve`` on loopback: q/s, latency percentiles, errors, lost writes.

    flock /tmp/colengine-bench.lock python bench/bench_serve.py --data DATA \\
        --duration 60

SciFact (MiniLM stand-in, encoded vectors cached and shared with the other benches) is built
into a PLAID index with metadata (``bucket``: a random integer in [0, 1000) per document) and
texts, served by a real ``colengine serve`` subprocess. Then, for 1, 4 and 16 concurrent
clients (threads, one keep-alive HTTP connection each), ``--duration`` seconds each:

- 90% searches (k=10; 20% of them with the filter ``{"bucket": {"$lt": 100}}``, 10% of the
  corpus), 10% writes (an add of one new document, or a delete of a document this client
  added earlier, half each);
- q/s (all requests), p50/p95/p99 latency per kind, errors (any non-200).

Before that, the same search sequence on one client, searches only, over HTTP and in process
(``Retriever.search`` on the same index): the cost of HTTP, measured twice: two windows one
after the other (q/s in each), and paired (each query in process, then over HTTP, in turn:
both sides under the same machine load). After the runs every acknowledged
write is checked (added documents present, deleted ones gone), then the server is killed with
SIGKILL, restarted, and checked again: "acknowledged writes lost" counts what is missing.
Finally the cost a write would have if it saved the index (one ``Retriever.save``), against the
log append it costs instead, and how soon a write is seen by another server process on the same
index (:func:`_visibility`: two ``colengine serve`` processes, writes through one, the other
polled every ``POLL_S``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]   # this checkout's colengine, and _common
from _common import add_data_argument, data_root, env_info, today  # noqa: E402

FILTER = {"bucket": {"$lt": 100}}
POLL_S = 0.005   # how often _visibility asks the other server


def _args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_data_argument(p)
    p.add_argument("--dataset", default="scifact")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per client count")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    p.add_argument("--nbits", type=int, default=2)
    p.add_argument("--refine", choices=["float16", "int8"], default=None,
                   help="build the index with refinement vectors (PlaidIndex.build's refine=)")
    p.add_argument("--work", default="/tmp/colengine-bench-serve", help="index folder parent")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--checkpoint-seconds", type=float, default=30.0)
    p.add_argument("--write-nice", type=int, default=None,
                   help="the server's --write-nice (default: the server's own default)")
    p.add_argument("--search-slots", type=int, default=None,
                   help="the server's --search-slots (default: the server's own, the cores; "
                        "0: no limit)")
    p.add_argument("--write-encoder", default=None, choices=["auto", "process", "thread"],
                   help="the server's --write-encoder (default: the server's own, auto)")
    p.add_argument("--table-only", default=None, metavar="JSON",
                   help="print the table (and redraw the plot) of an earlier result file")
    return p.parse_args()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, index: Path, workers: int, log: Path, checkpoint_seconds: float,
                 write_nice: int | None = None, search_slots: int | None = None,
                 write_encoder: str | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = open(log, "ab")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                           os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "colengine.cli", "serve", str(index), "--port", str(self.port),
             "--workers", str(workers), "--device", "cpu", "--log-level", "warning",
             "--checkpoint-seconds", str(checkpoint_seconds)]
            + ([] if write_nice is None else ["--write-nice", str(write_nice)])
            + ([] if search_slots is None else ["--search-slots", str(search_slots)])
            + ([] if write_encoder is None else ["--write-encoder", write_encoder]),
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
            start_new_session=True)
        from colengine import Client

        self.client = Client(self.url, timeout=120).wait_ready(timeout=300)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=120)
        self._log.close()


def _pct(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"n": 0}
    a = np.asarray(xs) * 1e3
    return {"n": len(xs), "p50_ms": float(np.percentile(a, 50)),
            "p95_ms": float(np.percentile(a, 95)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def _search_plan(queries: list[str], n: int, seed: int) -> list[tuple[str, bool]]:
    rng = random.Random(seed)
    return [(rng.choice(queries), rng.random() < 0.2) for _ in range(n)]


def _search_only(search, plan: list[tuple[str, bool]], duration: float) -> dict:
    """One client, the plan's searches in order until ``duration`` s: q/s and latencies."""
    lat, i, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        q, filtered = plan[i % len(plan)]
        t = time.perf_counter()
        search(q, FILTER if filtered else None)
        lat.append(time.perf_counter() - t)
        i += 1
    return {"qps": i / (time.perf_counter() - t0), **_pct(lat)}


def _paired(inproc, http, plan: list[tuple[str, bool]], duration: float) -> dict:
    """One client, each of the plan's searches run in process and then over HTTP, in turn,
    until ``duration`` s: the two sides see the same queries under the same machine load (the
    machine's load drifts between two separate windows by more than the overhead measured)."""
    t_in: list[float] = []
    t_http: list[float] = []
    i, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        q, filtered = plan[i % len(plan)]
        f = FILTER if filtered else None
        t = time.perf_counter()
        inproc(q, f)
        t_in.append(time.perf_counter() - t)
        t = time.perf_counter()
        http(q, f)
        t_http.append(time.perf_counter() - t)
        i += 1
    return {"pairs": i, "in_process": _pct(t_in), "http": _pct(t_http),
            "overhead": 1 - sum(t_in) / sum(t_http)}


def _load_phase(url: str, n_clients: int, duration: float, queries: list[str],
                texts: list[str], seed: int, ledger: dict) -> dict:
    import httpx

    lat: dict[str, list[float]] = {"search": [], "search_filtered": [], "add": [], "delete": []}
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(n_clients + 1)

    def client(c: int) -> None:
        rng = random.Random(seed * 1000 + c)
        mine: list[str] = []
        n = 0
        mylat: dict[str, list[float]] = {k: [] for k in lat}
        with httpx.Client(base_url=url, timeout=120) as h:
            start.wait()
            t_end = time.perf_counter() + duration
            while time.perf_counter() < t_end:
                r = rng.random()
                if r < 0.9:
                    filtered = rng.random() < 0.2
                    body = {"queries": [rng.choice(queries)], "k": 10}
                    if filtered:
                        body["filter"] = FILTER
                    kind, path = ("search_filtered" if filtered else "search"), "/search"
                elif r < 0.95 or not mine:
                    doc_id = f"bench-{n_clients}-{c}-{n}"
                    n += 1
                    body = {"documents": [{"id": doc_id, "text": rng.choice(texts),
                                           "metadata": {"bucket": rng.randrange(1000)}}]}
                    kind, path = "add", "/documents"
                else:
                    doc_id = mine.pop(rng.randrange(len(mine)))
                    body = {"ids": [doc_id]}
                    kind, path = "delete", "/documents/delete"
                t = time.perf_counter()
                try:
                    resp = h.post(path, json=body)
                    ok = resp.status_code == 200
                    detail = resp.text[:200]
                except httpx.HTTPError as e:
                    ok, detail = False, repr(e)
                mylat[kind].append(time.perf_counter() - t)
                if not ok:
                    with lock:
                        errors.append(f"{kind}: {detail}")
                    if kind == "delete":
                        mine.append(doc_id)
                    continue
                if kind == "add":
                    mine.append(doc_id)
                    with lock:
                        ledger["added"].add(doc_id)
                elif kind == "delete":
                    with lock:
                        ledger["deleted"].add(doc_id)
        with lock:
            for k, v in mylat.items():
                lat[k].extend(v)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(n_clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    n = sum(len(v) for v in lat.values())
    every = [x for v in lat.values() for x in v]
    searches = lat["search"] + lat["search_filtered"]
    return {"clients": n_clients, "seconds": wall, "requests": n, "qps": n / wall,
            "search_qps": len(searches) / wall, "all": _pct(every), "searches": _pct(searches),
            **{k: _pct(v) for k, v in lat.items()}, "errors": len(errors),
            "error_samples": errors[:5]}


def _lost(client, ledger: dict) -> dict:
    """Acknowledged adds (not deleted later) that are missing, and acknowledged deletes that
    came back."""
    from colengine.errors import UnknownIdError

    live = sorted(ledger["added"] - ledger["deleted"])
    missing = 0
    for a in range(0, len(live), 500):
        chunk = live[a:a + 500]
        try:
            client.get(chunk)
        except UnknownIdError:
            missing += sum(1 for i in chunk if not _exists(client, i))
    back = sum(1 for i in sorted(ledger["deleted"]) if _exists(client, i))
    return {"acknowledged_live": len(live), "acknowledged_deleted": len(ledger["deleted"]),
            "adds_lost": missing, "deletes_lost": back}


def _visibility(index: Path, log: Path, texts: list[str], n_adds: int, n_saves: int,
                checkpoint_seconds: float, seed: int) -> dict:
    """How soon a second server process on the same index sees what the first one writes.

    Two ``colengine serve`` processes (A and B, one worker each; separate processes are what
    ``--workers N`` runs, minus the shared port, so a write can be sent to one and looked for in
    the other). ``n_adds`` times: one document added through A; from its acknowledgement, B is
    asked for it every ``POLL_S`` until it answers (B applies A's log records before a request).
    Then ``n_saves`` times: one add through A, whose checkpoint (``checkpoint_seconds`` later)
    saves a new generation; from the moment ``manifest.json`` is renamed into place (its
    mtime), B's ``/info`` is polled until it reports that generation."""
    rng = random.Random(seed)
    run = time.strftime("%H%M%S")   # ids new to the index even when it was measured before
    a = _Server(index, 1, log, checkpoint_seconds)
    b = _Server(index, 1, log, checkpoint_seconds)
    try:
        adds = []
        for i in range(n_adds):
            doc_id = f"visible-{run}-{i}"
            a.client.add([rng.choice(texts)], ids=[doc_id], metadata=[{"bucket": 0}])
            t0 = time.perf_counter()
            while not _exists(b.client, doc_id):
                time.sleep(POLL_S)
            adds.append(time.perf_counter() - t0)
            time.sleep(0.05)
        saves = []
        manifest = index / "manifest.json"
        for i in range(n_saves):
            gen = b.client.info()["generation"]
            a.client.add([rng.choice(texts)], ids=[f"visible-save-{run}-{i}"],
                         metadata=[{"bucket": 0}])
            t_end = time.time() + checkpoint_seconds + 60
            while b.client.info()["generation"] == gen:
                if time.time() > t_end:
                    raise RuntimeError("server B never saw A's checkpoint")
                time.sleep(POLL_S)
            saves.append(time.time() - manifest.stat().st_mtime)
    finally:
        a.stop()
        b.stop()
    return {"poll_s": POLL_S, "checkpoint_seconds": checkpoint_seconds,
            "add_seen_by_other_process": _pct(adds), "add_max_ms": max(adds) * 1e3,
            "generation_seen_by_other_process": _pct(saves), "generation_max_ms": max(saves) * 1e3}


def _exists(client, doc_id: str) -> bool:
    from colengine.errors import UnknownIdError

    try:
        client.get([doc_id])
        return True
    except UnknownIdError:
        return False


def main() -> None:
    args = _args()
    if args.table_only:
        out = json.loads(Path(args.table_only).read_text())
        _plot(out, Path(args.table_only).with_suffix(".png"))
        _table(out)
        return
    data = data_root(args.data)
    import torch

    torch.set_num_threads(1)   # as each server worker (colengine serve --torch-threads 1)

    from colengine import Encoder, Retriever
    from colengine.cache import default_cache_dir
    from colengine.models import resolve_model_name
    from colengine.eval.datasets import load_dataset

    ds = load_dataset(data / args.dataset)
    texts = ds.documents()
    queries = list(ds.queries.values())
    rng = np.random.default_rng(args.seed)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    index = work / "idx"
    t0 = time.perf_counter()
    # the encoder of bench/_common.encoded, so that its cache of encoded SciFact is shared
    encoder = Encoder(str(resolve_model_name("minilm")), device="cpu")
    r = Retriever.build(texts, ds.doc_ids, model=encoder, path=index, nbits=args.nbits,
                        **({"refine": args.refine} if args.refine else {}),
                        cache_dir=default_cache_dir(), show_progress=False,
                        metadata=[{"bucket": int(b)} for b in rng.integers(0, 1000, len(texts))])
    build_s = time.perf_counter() - t0
    print(f"{args.dataset}: {len(r)} documents indexed in {build_s:.0f}s", flush=True)

    # the same searches in process and over HTTP, one client, searches only
    plan = _search_plan(queries, 2000, args.seed)
    half = max(5.0, args.duration / 2)
    r = Retriever.load(index)
    for q, f in plan[:5]:
        r.search(q, 10, filter=FILTER if f else None)
    inproc = _search_only(lambda q, f: r.search(q, 10, filter=f), plan, half)
    probe = Path(shutil.copytree(index, work / "save-probe"))
    rp = Retriever.load(probe, model=r.encoder)
    t = time.perf_counter()
    rp.save()     # what a write would cost if each one saved the index
    save_s = time.perf_counter() - t
    index_bytes = sum(p.stat().st_size for p in (probe / f"g{rp.generation:06d}").rglob("*"))
    shutil.rmtree(probe)
    del rp
    print(f"in process: {inproc['qps']:.1f} q/s, p50 {inproc['p50_ms']:.1f} ms", flush=True)

    log = work / "server.log"
    server = _Server(index, args.workers, log, args.checkpoint_seconds, args.write_nice,
                     args.search_slots, args.write_encoder)
    c = server.client
    for q, f in plan[:5]:
        c.search(q, 10, filter=FILTER if f else None)
    http = _search_only(lambda q, f: c.search(q, 10, filter=f), plan, half)
    overhead = 1 - http["qps"] / inproc["qps"]
    print(f"HTTP: {http['qps']:.1f} q/s, p50 {http['p50_ms']:.1f} ms (overhead {overhead:.1%})",
          flush=True)
    paired = _paired(lambda q, f: r.search(q, 10, filter=f),
                     lambda q, f: c.search(q, 10, filter=f), plan, half)
    print(f"paired, {paired['pairs']} queries each way: in process p50 "
          f"{paired['in_process']['p50_ms']:.1f} ms, HTTP p50 {paired['http']['p50_ms']:.1f} ms, "
          f"overhead {paired['overhead']:.1%}", flush=True)

    ledger: dict[str, set] = {"added": set(), "deleted": set()}
    phases = []
    for n in [int(x) for x in args.clients.split(",")]:
        res = _load_phase(server.url, n, args.duration, queries, texts, args.seed, ledger)
        phases.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "error_samples"}), flush=True)
    info_before = c.info()
    lost_live = _lost(c, ledger)
    server.stop(signal.SIGKILL)          # crash right after the last acknowledged write
    server = _Server(index, args.workers, log, args.checkpoint_seconds, args.write_nice,
                     args.search_slots, args.write_encoder)
    lost_after_kill = _lost(server.client, ledger)
    restart_info = server.client.info()
    server.stop()
    visible = _visibility(index, log, texts, 20, 8, 1.0, args.seed)
    print(f"seen by another server process: {json.dumps(visible)}", flush=True)

    info = env_info()
    info.update(dataset=args.dataset, documents=len(texts), nbits=args.nbits,
                refine=args.refine, k=10,
                workers=args.workers, duration_s=args.duration, build_s=build_s,
                torch_threads_bench=torch.get_num_threads(), model="minilm stand-in",
                mix="90% searches (20% filtered, 10% of the corpus allowed), 5% adds, "
                    "5% deletes of the client's own earlier adds",
                checkpoint_seconds=args.checkpoint_seconds, write_nice=args.write_nice,
                search_slots=args.search_slots, write_encoder=args.write_encoder,
                write_encoder_used=info_before.get("write_encoder"))
    out = {
        "env": info,
        "in_process_1_client": inproc, "http_1_client": http, "http_overhead": overhead,
        "http_overhead_paired": paired,
        "phases": phases,
        "writes": {"lost_while_running": lost_live, "lost_after_kill9_restart": lost_after_kill,
                   "server_stats_one_worker": info_before["stats"],
                   "replayed_on_restart": restart_info["stats"]["records_replayed"],
                   "save_whole_index_s": save_s, "index_bytes": index_bytes},
        "visibility": visible,
    }
    tag = f"_{args.refine}" if args.refine else ""
    name = f"serve_{args.dataset}_w{args.workers}{tag}_{today()}{args.tag}"
    path = HERE / "results" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    info["loadavg_end"] = list(os.getloadavg())
    path.write_text(json.dumps(out, indent=2) + "\n")
    _plot(out, HERE / "results" / f"{name}.png")
    print(f"wrote {path} and {path.with_suffix('.png')}")
    _table(out)


def _table(out: dict) -> None:
    i, h = out["in_process_1_client"], out["http_1_client"]
    print(f"\nsearches only, 1 client: in process {i['qps']:.1f} q/s (p50 {i['p50_ms']:.1f} ms), "
          f"HTTP {h['qps']:.1f} q/s (p50 {h['p50_ms']:.1f} ms): overhead {out['http_overhead']:.1%}")
    if "http_overhead_paired" in out:   # (results before 2026-12-06 have no paired run)
        pr = out["http_overhead_paired"]
        print(f"paired ({pr['pairs']} queries each way, alternating): in process p50 "
              f"{pr['in_process']['p50_ms']:.1f} ms, HTTP p50 {pr['http']['p50_ms']:.1f} ms: "
              f"overhead {pr['overhead']:.1%}")
    print("\n| clients | req/s | search q/s | all p50 / p95 / p99 ms | p99/p50 | "
          "unfiltered search p50 / p99 ms (ratio) | filtered search p50 / p99 ms | "
          "write p50/p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p in out["phases"]:
        a, u, f = p["all"], p["search"], p["search_filtered"]
        print(f"| {p['clients']} | {p['qps']:.1f} | {p['search_qps']:.1f} | {a['p50_ms']:.0f} / "
              f"{a['p95_ms']:.0f} / {a['p99_ms']:.0f} | {a['p99_ms'] / a['p50_ms']:.2f} | "
              f"{u['p50_ms']:.0f} / {u['p99_ms']:.0f} ({u['p99_ms'] / u['p50_ms']:.2f}) | "
              f"{f['p50_ms']:.0f} / {f['p99_ms']:.0f} | {_pct_merge(p)} | {p['errors']} |")
    w = out["writes"]
    print(f"\nacknowledged writes lost: running {w['lost_while_running']}, after kill -9 + restart "
          f"{w['lost_after_kill9_restart']}; saving the whole index once: "
          f"{w['save_whole_index_s']:.2f} s ({w['index_bytes'] / 2**20:.0f} MiB)")
    v = out.get("visibility")
    if v:
        a, g = v["add_seen_by_other_process"], v["generation_seen_by_other_process"]
        print(f"seen by another server process: an acknowledged add after p50 {a['p50_ms']:.0f} / "
              f"max {v['add_max_ms']:.0f} ms ({a['n']} adds); a new generation after p50 "
              f"{g['p50_ms']:.0f} / max {v['generation_max_ms']:.0f} ms of its manifest's "
              f"rename ({g['n']} checkpoints); polled every {v['poll_s'] * 1e3:.0f} ms")


def _pct_merge(p: dict) -> str:
    a, d = p["add"], p["delete"]
    if not a.get("n"):
        return "-"
    return f"add {a['p50_ms']:.0f}/{a['p99_ms']:.0f}, delete " + (
        f"{d['p50_ms']:.0f}/{d['p99_ms']:.0f}" if d.get("n") else "-")


def _plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases = out["phases"]
    x = [p["clients"] for p in phases]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(x, [p["qps"] for p in phases], "o-", label="all requests")
    a1.plot(x, [p["search_qps"] for p in phases], "s-", label="searches")
    a1.axhline(out["in_process_1_client"]["qps"], color="k", ls="--", lw=0.8,
               label="in process, 1 client, searches only")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("concurrent clients")
    a1.set_ylabel("requests / s")
    a1.legend(fontsize=8)
    for key, style in (("p50_ms", "o-"), ("p95_ms", "s-"), ("p99_ms", "^-")):
        a2.plot(x, [p["all"][key] for p in phases], style, label=key.replace("_ms", ""))
    a2.set_xscale("log", base=2)
    a2.set_yscale("log")
    a2.set_xlabel("concurrent clients")
    a2.set_ylabel("latency, all requests (ms)")
    a2.legend(fontsize=8)
    e = out["env"]
    fig.suptitle(f"colengine serve, {e['dataset']} ({e['documents']} docs, PLAID nbits "
                 f"{e['nbits']}, MiniLM stand-in), {e['workers']} worker(s), 90% search / 10% "
                 f"write — {e['cpu']}, {e['cpu_count']} cores, {e['date'][:10]}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
