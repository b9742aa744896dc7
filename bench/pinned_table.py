#!/usr/bin/env python3
"""Markdown tables from pinned.sh's results file: python3 pinned_table.py pinned.txt"""
import sys
from collections import defaultdict

from table import fmt, med, num, parse


def rows_of(rows, kind):
    return [r for r in rows if r.get("kind") == kind]


def result_and_big(rows):
    """Pairs each RESULT line with the BIG line printed just before it (mixed cells)."""
    out, big = [], None
    for r in rows:
        if "p9999_us" in r:  # a TAILS line: tails_of reads it
            continue
        if "size" in r and "mb_per_s" in r:
            big = r
            continue
        out.append((r, big))
        big = None
    return out


def tails_of(rows):
    """(round, big calls) -> (TAILS, RESULT, BIG) for cells run with TAILS=1, in run order."""
    out, big, tail = {}, None, None
    for r in rows:
        if "p9999_us" in r:
            tail = r
        elif "size" in r and "mb_per_s" in r:
            big = r
        elif "cps" in r:
            if tail:
                size = int(big["size"]) if big else 0
                label = "none" if size == 0 else (f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB")
                if big and big.get("dir", "echo") != "echo":
                    label += f" {big['dir']}"
                out[(r["round"], label)] = (tail, r, big)
            big, tail = None, None
    return out


def main():
    header, rows = parse(sys.argv[1])
    out = [f"_{h}_  " for h in header]

    scaling = [r for r in rows_of(rows, "scaling") + rows_of(rows, "server-cores") if "cps" in r]
    if scaling:
        out += ["", "### Callers over connections (server and client on cores of their own)", ""]
        out.append("| cell | server cores | floor calls/s | towerpc calls/s | ratio | towerpc p99 µs | towerpc CPU s / M calls |")
        out.append("|---|---|---:|---:|---:|---:|---:|")
        cells = defaultdict(dict)
        for r in scaling:
            key = (r["kind"], r["scpu"], int(r["conc"]), int(r.get("conns", 1)))
            cells[key][r["label"]] = r
        for (kind, scpu, conc, conns), by in cells.items():
            floor, ours = by.get("raw"), by.get("towerpc")
            fc, oc = num(floor or {}, "cps"), num(ours or {}, "cps")
            ratio = fmt(oc / fc, 2) if fc and oc else "–"
            out.append(
                f"| C={conc:,}, {conns} conn. | {scpu} | {fmt(fc)} | {fmt(oc)} | {ratio} "
                f"| {fmt(num(ours or {}, 'p99_us'))} | {fmt(num(ours or {}, 'cpu_s_per_M'), 2)} |"
            )

    mixed = {}
    for build in ("head", "old"):
        for r, big in result_and_big(rows_of(rows, f"mixed-{build}")):
            if big and big.get("dir", "echo") != "echo":
                continue  # downloads: this build only, in the table below
            size = int(big["size"]) if big else 0
            mixed.setdefault((r["round"], size), {})[build] = (r, big)
    if mixed:
        out += ["", "### Mixed: 1,000 small callers beside 10 big ones, this build against fe3ff0d (before fragments)", ""]
        out.append("| round | big requests | small p99 µs, fe3ff0d → now | small calls/s, fe3ff0d → now | big MB/s, fe3ff0d → now | big ratio |")
        out.append("|---|---|---|---|---|---:|")
        for (rnd, size), by in sorted(mixed.items()):
            if "head" not in by or "old" not in by:
                continue
            (ro, bo), (rn, bn) = by["old"], by["head"]
            label = "none" if size == 0 else (f"{size // 1024} KiB" if size < 1 << 20 else f"{size >> 20} MiB")
            bmo, bmn = num(bo or {}, "mb_per_s"), num(bn or {}, "mb_per_s")
            ratio = fmt(bmn / bmo, 2) if bmo and bmn else "–"
            out.append(
                f"| {rnd} | {label} | {fmt(num(ro, 'p99_us'))} → {fmt(num(rn, 'p99_us'))} "
                f"| {fmt(num(ro, 'cps'))} → {fmt(num(rn, 'cps'))} | {fmt(bmo)} → {fmt(bmn)} | {ratio} |"
            )

    tails = tails_of(rows_of(rows, "mixed-head"))
    if tails:
        out += ["", "### Mixed, this build: the small calls' latency beside the big ones ÷ alone, same round", ""]
        out.append("| round | big calls | small calls/s | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 ÷ alone | big MB/s |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|")
        alone = {rnd: t for (rnd, label), (t, r, big) in tails.items() if label == "none"}
        for (rnd, label), (t, r, big) in tails.items():
            a = alone.get(rnd)
            ratio = fmt(num(t, "p99_us") / num(a, "p99_us"), 2) if a and num(a, "p99_us") else "–"
            out.append(
                f"| {rnd} | {label} | {fmt(num(r, 'cps'))} | {fmt(num(t, 'p50_us'))} | {fmt(num(t, 'p90_us'))} "
                f"| {fmt(num(t, 'p99_us'))} | {fmt(num(t, 'p999_us'))} | {ratio} | {fmt(num(big or {}, 'mb_per_s'))} |"
            )

    one = [r for r in rows_of(rows, "one") if "cps" in r]
    if one:
        out += ["", "### One caller", ""]
        out.append("| round | floor calls/s | towerpc calls/s | ratio | CPU per call ratio |")
        out.append("|---|---:|---:|---:|---:|")
        by = defaultdict(dict)
        for r in one:
            by[r["round"]][r["label"]] = r
        ratios = []
        for rnd, b in sorted(by.items()):
            f, t = b.get("raw", {}), b.get("towerpc", {})
            fc, tc = num(f, "cps"), num(t, "cps")
            fu, tu = num(f, "cpu_s_per_M"), num(t, "cpu_s_per_M")
            if fc and tc:
                ratios.append(tc / fc)
            out.append(
                f"| {rnd} | {fmt(fc)} | {fmt(tc)} | {fmt(tc / fc, 2) if fc and tc else '–'} "
                f"| {fmt(tu / fu, 2) if fu and tu else '–'} |"
            )
        if ratios:
            out.append(f"| median | | | {fmt(med(ratios), 2)} | |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
