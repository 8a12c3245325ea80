"""Throughput of `zhllama data clean` on shared/data/pretrain_zh, with the default filters and dedup.

Runs clean_files on every core, then again with one worker on the same input, and reports what was kept and
dropped (documents and characters per reason), documents/s, MB/s of input, and the speed-up from the cores.
Both runs must write byte-identical output: the worker count may change the speed, never the result.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, write_results

from zhllama.artifacts import file_sha256
from zhllama.data.clean import DROP_REASONS, CleanConfig, clean_files


def run(files: list[Path], out: Path, workers: int) -> tuple[dict, str]:
    """Clean `files`; the report gains `cpu_seconds`, parent and workers together, which other load on the
    machine inflates much less than wall time."""
    start, children = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    report = clean_files(files, out, out.with_suffix(".report.json"), CleanConfig(workers=workers))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_seconds"] = round(time.process_time() - start + after.ru_utime + after.ru_stime
                                  - children.ru_utime - children.ru_stime, 1)
    return report, file_sha256(out)


def _burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def headroom(processes: int) -> float:
    """Speed-up of a pure busy loop on `processes` processes over one: the most any program could get from
    this machine's cores right now, given what else is running on it."""
    tasks = [2_000_000] * (4 * processes)
    start = time.perf_counter()
    list(map(_burn, tasks))
    serial = time.perf_counter() - start
    with multiprocessing.Pool(processes) as pool:
        start = time.perf_counter()
        pool.map(_burn, tasks, chunksize=1)
        return serial / (time.perf_counter() - start)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--single-files", type=int, default=None,
                   help="measure the one-worker run on only the first N files (default: all)")
    args = p.parse_args()
    files = sorted((args.data / "pretrain_zh").glob("*.jsonl"))
    if not files:
        sys.exit(f"no .jsonl files in {args.data / 'pretrain_zh'}")
    work = args.work / "clean"
    work.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]

    full, full_sha = run(files, work / "all-cores.jsonl", cores)
    single_files = files[:args.single_files] if args.single_files else files
    single, single_sha = run(single_files, work / "one-worker.jsonl", 1)
    control = headroom(cores)
    same_input = single_files == files

    docs, chars = full["documents"], full["characters"]
    mb = sum(f.stat().st_size for f in files) / 1e6
    lines = [(f"Input: {args.data / 'pretrain_zh'}, {len(files)} files, {mb:.1f} MB, {docs['in']:,} documents, "
              f"{chars['in']:,} characters. {cores} CPUs; load average {load:.1f} when the run started "
              f"(other work on the machine slows both runs). {time.strftime('%Y-%m-%d')}."),
             "", "| | documents | share | characters | share |", "|---|---|---|---|---|"]

    def row(name: str, n_docs: int, n_chars: int) -> str:
        return (f"| {name} | {n_docs:,} | {n_docs / docs['in']:.1%} | {n_chars:,} | "
                f"{n_chars / chars['in']:.1%} |")

    lines.append(row("in", docs["in"], chars["in"]))
    lines.append(row("**kept**", docs["kept"], chars["kept"]))
    for reason in DROP_REASONS:
        lines.append(row(f"dropped: {reason}", docs["dropped"][reason], chars["dropped"][reason]))
    lines.append(f"| written (normalised text) | | | {chars['written']:,} | {chars['written'] / chars['in']:.1%} |")
    lines.append(f"| malformed lines skipped | {full['malformed']['count']:,} | | | |")

    subset = "all files" if same_input else f"first {len(single_files)} files (subset)"
    speedup = full["docs_per_s"] / single["docs_per_s"]
    lines += ["", "| run | workers | input | seconds | docs/s | MB/s | CPU seconds (parent + workers) |",
              "|---|---|---|---|---|---|---|",
              (f"| all cores | {cores} | all files | {full['seconds']:.1f} | {full['docs_per_s']:,.0f} | "
               f"{full['mb_per_s']:.2f} | {full['cpu_seconds']:.1f} |"),
              (f"| one worker | 1 | {subset} | {single['seconds']:.1f} | {single['docs_per_s']:,.0f} | "
               f"{single['mb_per_s']:.2f} | {single['cpu_seconds']:.1f} |"),
              "", (f"Speed-up, all cores over one worker (docs/s): {speedup:.2f}x. Control: a pure busy loop on "
                   f"{cores} processes over one got {control:.2f}x on this machine at the same time."
                   + (f" Outputs byte-identical: {full_sha == single_sha}." if same_input else ""))]
    write_results("clean_throughput", {"all_cores": full, "one_worker": single, "busy_loop_speedup": control,
                                       "identical_output": full_sha == single_sha if same_input else None},
                  "\n".join(lines))


if __name__ == "__main__":
    main()
