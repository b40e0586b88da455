"""Run several `bench_step.py` configurations back to back on one machine; one JSON with them all.

Each configuration runs in its own process (a fresh Ray, vLLM and DeepSpeed), so a crash in one
leaves the others' results. On a GPU host, one call of this script measures the baselines
and every mode on the same device in the same run:

  python experiments/bench/run_matrix.py --out $OUT/matrix.json \\
      raw="--parts a,b" gpu1="--parts c --sleep" gpu2="--parts c --sleep --gpus 2"

Arguments before the configurations (`--shape`, `--prompts`, ...) are shared by all of them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="combined JSON")
    ap.add_argument("--shared", default="", help="arguments every configuration gets")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    ap.add_argument(
        "--first-extra",
        type=float,
        default=150,
        help="extra seconds for the first configuration: on a fresh host vLLM's first start compiles "
        "(torch.compile, CUDA graphs; 144 s seen on an H200) and later starts reuse the cache",
    )
    ap.add_argument("configs", nargs="+", help='NAME="bench_step.py arguments"')
    args = ap.parse_args()
    out = Path(args.out)
    combined: dict = {}
    for item in args.configs:
        name, _, rest = item.partition("=")
        if not name or not rest:
            raise SystemExit(f'configuration {item!r}: expected NAME="arguments"')
        run_dir = out.parent / f"{out.stem}-{name}"
        cmd = [sys.executable, str(HERE / "bench_step.py"), *shlex.split(args.shared), *shlex.split(rest)]
        cmd += ["--out", str(run_dir)]
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / "log.txt"
        # the log goes to the console and to run_dir/log.txt; a failure keeps its tail
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        limit = args.timeout + (args.first_extra if not combined else 0)
        killer = threading.Timer(limit, proc.kill)
        killer.start()
        with open(log, "w") as sink:
            for line in proc.stdout:
                sys.stdout.write(line)
                sink.write(line)
        rc = proc.wait()
        rc = "timeout" if not killer.is_alive() and rc != 0 else rc
        killer.cancel()
        entry = {"command": " ".join(cmd), "rc": rc, "wall_s": time.perf_counter() - t0}
        if rc != 0:
            entry["log_tail"] = log.read_text()[-6000:]
        result = run_dir / "result.json"
        if result.exists():
            data = json.loads(result.read_text())
            data.get("rlhf", {}).pop("sync_alone", None)
            entry.update(data)
        combined[name] = entry
        out.write_text(json.dumps(combined, indent=1, default=str))  # after each: a later crash keeps it
        print(
            f"== {name}: rc={rc} in {entry['wall_s']:.0f}s; summary {json.dumps(entry.get('summary'))}",
            flush=True,
        )


if __name__ == "__main__":
    main()
