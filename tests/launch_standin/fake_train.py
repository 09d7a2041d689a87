"""A stand-in for the train command in the launchers' quick tests (tests/test_launchers.py): no JAX, just the
behaviour the launchers rely on. It writes `started-<process id>` (its PID, argv and working directory) into
the `--workdir`, counts steps until `--steps` or SIGTERM, then "saves" for `--save-seconds` and writes
`saved-<process id>` with the step it stopped at, and exits 0 (`--exit` N: exits N instead)."""

import argparse
import json
import os
import signal
import sys
import time


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--save-seconds", type=float, default=2.0)
    parser.add_argument("--exit", type=int, default=0)
    args, _ = parser.parse_known_args()
    rank = os.environ.get("VRFT_PROCESS_ID", "0")
    heard = []
    signal.signal(signal.SIGTERM, lambda signum, frame: heard.append(signum))
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, f"started-{rank}"), "w", encoding="utf-8") as f:
        json.dump({"pid": os.getpid(), "argv": sys.argv, "cwd": os.getcwd(),
                   "launch": os.environ.get("VRFT_LAUNCH")}, f)
    step = 0
    while step < args.steps and not heard:
        time.sleep(0.1)
        step += 1
    print(f"worker {rank}: {'SIGTERM' if heard else 'done'} at step {step}", flush=True)
    time.sleep(args.save_seconds if heard else 0)
    with open(os.path.join(args.workdir, f"saved-{rank}"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "time": time.time()}, f)
    return args.exit


if __name__ == "__main__":
    sys.exit(main())
