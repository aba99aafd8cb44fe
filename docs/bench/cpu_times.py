"""CPU seconds used so far by each process under a `dsv32-serve up` (and by this shell's loadtest).

    python docs/bench/cpu_times.py UP_PID > before.json; ...; python docs/bench/cpu_times.py UP_PID before.json
prints one line per process: role, CPU seconds since `before.json` (user + system), then the
cluster's total and the whole machine's (every process, from /proc/stat): the difference, less
the harness, is what other users of the machine took meanwhile.
"""

import json
import os
import sys
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in Path("/proc").iterdir():
        if e.name.isdigit():
            try:
                ppid = int((e / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(e.name))
    return out


def snapshot(root: int) -> dict[str, float]:
    kids, todo, seen = _children(), [root], {}
    while todo:
        pid = todo.pop()
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        name = next((args[i + 1] for i, a in enumerate(args) if a == "--worker-id" and i + 1 < len(args)), None)
        if name is None:
            name = "up" if pid == root else "router" if "router" in args else os.path.basename(args[0]) if args else str(pid)
        seen[f"{name}[{pid}]"] = (int(stat[11]) + int(stat[12])) / TICK  # utime + stime
        todo += kids.get(pid, [])
    cpu = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    seen[MACHINE] = sum(int(v) for v in cpu[:3] + cpu[5:8]) / TICK  # user nice system irq softirq steal
    return seen


MACHINE = "machine (all processes)"


if __name__ == "__main__":
    now = snapshot(int(sys.argv[1]))
    if len(sys.argv) > 2:
        before = json.loads(Path(sys.argv[2]).read_text())
        used = {k: v - before.get(k, 0.0) for k, v in now.items()}
        machine = used.pop(MACHINE)
        for k, v in sorted(used.items()):
            print(f"  {k:<34} {v:8.1f} CPU s")
        print(f"  {'cluster total':<34} {sum(used.values()):8.1f} CPU s")
        print(f"  {MACHINE:<34} {machine:8.1f} CPU s")
    else:
        print(json.dumps(now))
