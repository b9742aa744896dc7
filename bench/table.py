#!/usr/bin/env python3
"""Markdown tables from bench/run's results file: python3 table.py RESULTS.txt"""
import statistics
import sys
from collections import defaultdict

FLOOR = "raw"
# A cell during which the host stole this much of the machine's CPU time (run_cell.sh's
# steal_pct, from /proc/stat) is marked: its figures say more about the host than the systems.
STEAL_MARK = 5.0
NAMES = {
    "raw": "floor (tokio)",
    "towerpc": "towerpc",
    "towerpc-raw": "towerpc raw svc",
    "tarpc": "tarpc",
    "tonic": "tonic",
    "gorpc-nocomp": "gorpc (no comp.)",
    "gorpc": "gorpc",
    "towerpc-zstd": "towerpc zstd",
}


def parse(path):
    header, rows = [], []
    for line in open(path):
        line = line.strip()
        if line.startswith("#"):
            header.append(line[1:].strip())
            continue
        fields = line.split()
        rec = {}
        for f in fields:
            if "=" in f:
                k, v = f.split("=", 1)
                rec[k] = v
        rec["line"] = fields[2] if len(fields) > 2 else ""  # RESULT or BIG
        rows.append(rec)
    return header, rows


def num(rec, key):
    try:
        return float(rec[key])
    except (KeyError, ValueError):
        return None


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "–"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


def main():
    header, rows = parse(sys.argv[1])
    out = []
    out += [f"_{h}_  " for h in header]
    out.append("")

    peer = [r for r in rows if r.get("kind") == "peer" and r["line"] == "RESULT"]
    systems = [s for s in NAMES if any(r["label"] == s for r in peer)]
    cells = []
    for r in peer:
        c = (r["payload"], int(r["conc"]))
        if c not in cells:
            cells.append(c)
    by = defaultdict(dict)  # (payload, conc, system) -> round -> rec
    for r in peer:
        by[(r["payload"], int(r["conc"]), r["label"])][r["round"]] = r
    rounds = sorted({r["round"] for r in peer})

    def cps_rounds(cell, sys_):
        cols = []
        for rd in rounds:
            rec = by[(*cell, sys_)].get(rd, {})
            steal = num(rec, "steal_pct")
            mark = "†" if steal is not None and steal >= STEAL_MARK else ""
            cols.append(fmt(num(rec, "cps")) + mark)
        return " · ".join(cols)

    def ratio_rounds(cell, sys_, key="cps", base=FLOOR):
        vals = []
        for rd in rounds:
            a = num(by[(*cell, sys_)].get(rd, {}), key)
            b = num(by[(*cell, base)].get(rd, {}), key)
            vals.append(a / b if a and b else None)
        return vals

    if peer:
        out.append("### Calls/s per round (r1 · r2 …), and each system ÷ the floor in the same round")
        out.append("")
        if any(num(r, "steal_pct") is not None for r in peer):
            out.append(
                f"† the host stole {STEAL_MARK:.0f} % or more of the machine's CPU time during that cell "
                "(`steal` in /proc/stat)."
            )
            out.append("")
        out.append("| payload | callers | " + " | ".join(NAMES[s] for s in systems) + " |")
        out.append("|---|---:|" + "---:|" * len(systems))
        for cell in cells:
            cols = []
            for s in systems:
                cps = cps_rounds(cell, s)
                if s != FLOOR:
                    rat = " · ".join(fmt(v, 2) for v in ratio_rounds(cell, s))
                    cols.append(f"{cps} (×{rat})")
                else:
                    cols.append(cps)
            out.append(f"| {cell[0]} | {cell[1]:,} | " + " | ".join(cols) + " |")
        out.append("")

        if "towerpc" in systems:
            peers = [s for s in systems if s not in ("towerpc", "towerpc-raw")]
            out.append("### towerpc (dispatcher) ÷ each peer, same round (r1 · r2 …)")
            out.append("")
            out.append("| payload | callers | " + " | ".join(NAMES[s] for s in peers) + " |")
            out.append("|---|---:|" + "---:|" * len(peers))
            for cell in cells:
                cols = [" · ".join(fmt(v, 2) for v in ratio_rounds(cell, "towerpc", base=s)) for s in peers]
                out.append(f"| {cell[0]} | {cell[1]:,} | " + " | ".join(cols) + " |")
            out.append("")

        out.append("### Every figure (median of the rounds)")
        out.append("")
        out.append(
            "CPU is client + server CPU-seconds per call; RSS is peak (VmHWM); wire is loopback bytes "
            "per call (headers and ACKs included); socket writes count both processes' own writes "
            "(towerpc's counters; – where a system has none); wake-ups are `write` syscalls from "
            "`/proc/PID/io` (eventfd wake-ups of parked runtime threads; sockets use `send`); steal is "
            "the share of the machine's CPU time the host gave to others during the cell."
        )
        out.append("")
        out.append(
            "| payload | callers | system | calls/s | × floor | p50 µs | p99 µs | CPU µs/call | "
            "client RSS MiB | server RSS MiB | wire B/call | socket writes/call | wake-ups/call | errors | "
            "steal % |"
        )
        out.append("|---|---:|---|" + "---:|" * 12)
        for cell in cells:
            for s in systems:
                recs = list(by[(*cell, s)].values())
                if not recs:
                    continue
                m = lambda k: med([num(r, k) for r in recs])
                ratio = med(ratio_rounds(cell, s)) if s != FLOOR else None
                cpu = m("cpu_s_per_M")
                errs = sum(int(r.get("errs", 0)) for r in recs)
                crss, srss = m("cli_rss_kb"), m("srv_rss_kb")
                out.append(
                    f"| {cell[0]} | {cell[1]:,} | {NAMES[s]} | {fmt(m('cps'))} | {fmt(ratio, 2)} | "
                    f"{fmt(m('p50_us'))} | {fmt(m('p99_us'))} | {fmt(cpu, 2)} | "
                    f"{fmt(crss / 1024 if crss else None, 1)} | {fmt(srss / 1024 if srss else None, 1)} | "
                    f"{fmt(m('lo_bytes_per_call'), 1)} | {fmt(m('sock_writes_per_call'), 4)} | "
                    f"{fmt(m('wake_writes_per_call'), 4)} | {errs:,} | {fmt(m('steal_pct'), 1)} |"
                )
        out.append("")

    mixed = [r for r in rows if r.get("kind") == "mixed"]
    if mixed:
        out.append("### Mixed: 1,000 small callers beside 10 big ones, one connection (towerpc raw svc; big calls echo their bytes; `up`: a big request for a one-byte reply; `down`: an 8-byte request for a big reply)")
        out.append("")
        out.append("| round | big requests | small calls/s | small p50 µs | small p99 µs | p99 ÷ alone | big calls/s | big MB/s | big p99 ms | steal % |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        # Each cell prints BIG (when there are big callers) then RESULT.
        groups, pending_big = [], None
        for r in mixed:
            if r["line"] == "BIG":
                pending_big = r
            else:
                groups.append((r, pending_big))
                pending_big = None
        alone = {}
        for res, big in groups:
            if big is None:
                alone[res["round"]] = num(res, "p99_us")
        for res, big in groups:
            size = "none" if big is None else f"{int(big['size']) // 1024:,} KiB"
            if big is not None and big.get("dir", "echo") != "echo":
                size += f" {big['dir']}"
            base = alone.get(res["round"])
            p99 = num(res, "p99_us")
            out.append(
                f"| {res['round']} | {size} | {fmt(num(res, 'cps'))} | {fmt(num(res, 'p50_us'))} | {fmt(p99)} | "
                f"{fmt(p99 / base if base and p99 else None, 2)} | "
                f"{fmt(num(big, 'cps') if big else None, 1)} | {fmt(num(big, 'mb_per_s') if big else None, 1)} | "
                f"{fmt(num(big, 'p99_us') / 1000 if big else None, 1)} | {fmt(num(res, 'steal_pct'), 1)} |"
            )
        out.append("")

    comp = [r for r in rows if r.get("kind") == "compression" and r["line"] == "RESULT"]
    if comp:
        out.append("### Compression, 100 callers: calls/s and wire bytes (median of rounds), ÷ uncompressed in the same round")
        out.append("")
        out.append("| payload | system | calls/s | ÷ uncompressed | wire B/call | CPU µs/call |")
        out.append("|---|---|---:|---:|---:|---:|")
        cby = defaultdict(dict)
        for r in comp:
            cby[(r["payload"], r["label"])][r["round"]] = r
        plain_of = {"towerpc-zstd": "towerpc", "gorpc": "gorpc-nocomp"}
        for (pl, s), recs in sorted(cby.items()):
            m = lambda k: med([num(r, k) for r in recs.values()])
            ratios = []
            base = plain_of.get(s)
            if base:
                for rd, r in recs.items():
                    b = cby.get((pl, base), {}).get(rd)
                    if b:
                        ratios.append(num(r, "cps") / num(b, "cps"))
            out.append(
                f"| {pl} | {NAMES.get(s, s)} | {fmt(m('cps'))} | {fmt(med(ratios), 2) if ratios else '–'} | "
                f"{fmt(m('lo_bytes_per_call'), 1)} | {fmt(m('cpu_s_per_M'), 2)} |"
            )
        out.append("")

    print("\n".join(out))


if __name__ == "__main__":
    main()
