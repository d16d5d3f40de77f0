"""Timer of benches/front.sh: each command run RUNS times per binary, the binaries alternating
run by run (so a load change on the machine hits both alike), timed from spawn to exit with
posix_spawn (no shell in between), peak RSS from wait4; stdout and stderr to /dev/null. With two
binaries, the ratio is also taken pair by pair (run i of one against run i of the other).
  front_time.py WORK RUNNER [BASE_RUNNER]"""
import glob
import os
import statistics
import sys
import time

work, bins = sys.argv[1], sys.argv[2:]
runs, run_runs = int(os.environ["RUNS"]), int(os.environ["RUN_RUNS"])
png = os.path.join(work, "out.png")
manifests = sorted(glob.glob("manifests/*.toml"))
# (label, argv after the binary, runs, goal in ms or as a ratio to the base)
cases = [
    ("runner --version", ["--version"], runs, "<= 5 ms"),
    ("runner validate manifests/tiny-sd15.toml", ["validate", "manifests/tiny-sd15.toml"], runs, "<= 20 ms"),
    (f"runner validate --manifest-only manifests/*.toml ({len(manifests)} files)", ["validate", "--manifest-only", *manifests], runs, "<= 50 ms"),
    ("runner plan, full-size SD3.5-large (sparse)", ["plan", os.path.join(work, "sd35-large.toml")], runs, "<= 50 ms"),
    ("runner run, tiny SD 1.5 (4 steps, 64x64)", ["run", os.path.join(work, "tiny-sd15.toml"), "--quiet", "--out", png], run_runs, "<= 1.02x base"),
]
devnull = os.open(os.devnull, os.O_WRONLY)
env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")


def once(binary, args):
    start = time.perf_counter()
    pid = os.posix_spawn(binary, [binary, *args], env, file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
    _, status, usage = os.wait4(pid, 0)
    elapsed = (time.perf_counter() - start) * 1000
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{binary} {' '.join(args)}: exit {os.waitstatus_to_exitcode(status)}")
    return elapsed, usage.ru_maxrss / 1024


names = ["runner"] + (["base"] if len(bins) > 1 else [])
two = len(bins) > 1
print(f"binaries: runner = {bins[0]}" + (f", base = {bins[1]}" if two else ""))
print("\n| command | " + " | ".join(f"{n}, ms: median (min - max)" for n in names) + (" | runner / base: of the medians (pairwise min - max)" if two else "") + " | " + " | ".join(f"{n} peak RSS, MiB" for n in names) + " | goal |")
print("|---|" + "---|" * len(names) + ("---|" if two else "") + "---|" * len(names) + "---|")
for label, args, n, goal in cases:
    for b in bins:  # warm the page cache and libtorch's files
        once(b, args)
    times, rss = [[] for _ in bins], [[] for _ in bins]
    for _ in range(n):
        for i, b in enumerate(bins):
            t, m = once(b, args)
            times[i].append(t)
            rss[i].append(m)
    med = [statistics.median(t) for t in times]
    cells = [f"{m:.1f} ({min(t):.1f} - {max(t):.1f})" for m, t in zip(med, times)]
    if two:
        pairs = [a / b for a, b in zip(times[0], times[1])]
        cells.append(f"{med[0] / med[1]:.3f} ({min(pairs):.3f} - {max(pairs):.3f})")
    cells += [f"{statistics.median(r):.0f}" for r in rss]
    print(f"| {label} | " + " | ".join(cells) + f" | {goal} |")
print(f"\n{runs} processes per command and binary ({run_runs} for run), alternating binaries; wall time from spawn to exit; medians.")
