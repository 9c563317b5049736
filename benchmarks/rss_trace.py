"""Where a command's peak RSS is: run ``layerwise.cli`` in this process with a thread sampling RSS.

Every `--interval` seconds a thread reads this process's resident set size (``/proc/self/statm``); each
time it reaches a new high (by more than `--step` MiB) it records the main thread's Python stack, so the
report names the code that was running at the peak. Big torch operations release the GIL, so the
sampler sees the stack of the operation that allocates.

    python benchmarks/rss_trace.py --out trace.json -- --quiet compress MODEL --stream --uniform 4 --out CKPT

Prints the highs (RSS, seconds, innermost layerwise frames) and writes them with the whole RSS timeline
(one sample per 0.5 s) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import traceback

MiB = 2**20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def where(frame) -> list[str]:
    """The innermost frames of our own code (layerwise, benchmarks), innermost last."""
    frames = [f for f in traceback.extract_stack(frame)
              if "/site-packages/" not in f.filename and "/lib/python3" not in f.filename]
    return [f"{os.path.basename(f.filename)}:{f.lineno} {f.name}: {(f.line or '').strip()[:90]}" for f in frames[-4:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file for the highs and the timeline")
    parser.add_argument("--interval", type=float, default=0.01)
    parser.add_argument("--step", type=float, default=32.0, help="MiB a new high must add to be recorded")
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- then layerwise.cli arguments")
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    main_id = threading.get_ident()
    highs: list[dict] = []
    timeline: list[tuple[float, float]] = []
    done = threading.Event()
    start = time.perf_counter()

    def sample() -> None:
        best, last_t = 0, -1.0
        while not done.wait(args.interval):
            now, t = rss(), time.perf_counter() - start
            if t - last_t >= 0.5:
                timeline.append((round(t, 2), round(now / MiB)))
                last_t = t
            if now > best + args.step * MiB:
                best = now
                frame = sys._current_frames().get(main_id)
                highs.append({"rss_mib": round(now / MiB), "t": round(t, 2), "where": where(frame) if frame else []})
                del frame  # a frame kept here would keep its locals (big tensors) alive after it returns

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    from layerwise.cli import main as cli_main

    code = 0
    try:
        code = cli_main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        done.set()
        thread.join()
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for h in highs[-12:]:
        print(f"{h['rss_mib']:6d} MiB at {h['t']:7.1f} s  " + "  <  ".join(reversed(h["where"])))
    print(f"peak RSS (ru_maxrss) {peak / MiB:.0f} MiB")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"argv": argv, "peak_mib": round(peak / MiB), "highs": highs, "timeline": timeline}, f, indent=1)
    sys.exit(code)


if __name__ == "__main__":
    main()
