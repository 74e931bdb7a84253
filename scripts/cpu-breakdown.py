#!/usr/bin/env python3
"""Where a migration's CPU goes, per side, from a system-wide `perf record -a` taken around it.

Usage: perf record -a -F 999 -o DATA -- COMMAND...; scripts/cpu-breakdown.py DATA [N]
(N: also list each side's N busiest symbols outside the categories)

Each sample is given to the livemig process it was taken in (the source is the one with lm-scan threads, the
destination the one with lm-data threads; a one-process demo is both, split by thread) and to a category by its
symbol. Only samples inside the migration count: from the first to the last sample of a data link's thread
(lm-write*, lm-data, which live only while data moves), so building the guest and preallocating are left out.
Kernel softirq work done in other threads (ksoftirqd) is listed apart. Prints CPU-seconds per category (samples /
frequency), so that runs at different lengths compare.
"""
import collections
import re
import subprocess
import sys

CATEGORIES = [
    ("dirty scan", r"scan_parallel|dirty::"),
    ("encoding (zero check, codec choice, batching)", r"push_run|looks_compressible|is_zero|encode_entries|"
     r"start_batch|BatchEncoder"),
    ("compression", r"ZSTD_|HUF_|FSE_|HIST_|lz4_flex|zstd"),
    ("hashing", r"xxh|twox_hash|xxhash"),
    ("encryption", r"aes_gcm|aesni|gcm_|ghash|ring_core|chacha|poly1305"),
    ("page clearing and faults", r"clear_page|clear_huge|exc_page_fault|handle_mm_fault|do_anonymous|"
     r"__handle_mm|folio_zero|do_huge_pmd|vma_alloc|alloc_pages|get_page_from_freelist|__alloc|rmqueue|"
     r"madvise|populate|faultin|lru_|memcg|mem_cgroup|zap_|release_pages|free_pages|free_unref|__folio"),
    ("copies", r"memmove|memcpy|copy_user|_copy_to_iter|_copy_from_iter|copy_page|rep_movs|skb_copy_datagram"),
    ("io_uring", r"^io_|io_uring|__io_"),
    ("network stack", r"tcp_|ip_|__ip|inet_|sock_|sk_|skb|__skb|dev_|__dev|netif|net_rx|napi|veth|tbf|qdisc|"
     r"__netif|ipv4|__tcp|kfree_skb|consume_skb|__kfree_skb|nf_|__sk|sendmsg|recvmsg|__sys_send|__sys_recv|"
     r"___sys|__inet|neigh|eth_|validate_xmit|__napi|process_backlog|__qdisc|csum|lock_sock|release_sock|"
     r"handle_softirqs|net_tx_action|bbr_"),
    ("interrupts re-enabled (where a VM's deferred interrupt work is sampled)", r"_raw_spin_unlock_irq"),
    ("scheduling and wakeups", r"schedule|switch_to|futex|try_to_wake|wake_up|finish_task|pick_next|enqueue|"
     r"dequeue|update_curr|update_load|select_task|ttwu|__wake|hrtimer|tick_|native_sched|psi_|"
     r"syscall_exit_to_user|irqentry_exit|crossbeam_channel|sched_yield|park"),
    ("syscall entry", r"entry_SYSCALL|do_syscall|syscall_return|__x64_sys|ksys_|fdget|fput|__fget"),
]
COMPILED = [(name, re.compile(p)) for name, p in CATEGORIES]
SOURCE_THREADS = ("lm-scan", "lm-write")
DEST_THREADS = ("lm-data", "lm-accept", "lm-prefault")


def category(sym):
    for name, rx in COMPILED:
        if rx.search(sym):
            return name
    return "other"


def main():
    data = sys.argv[1]
    freq = None
    header = subprocess.run(["perf", "report", "-i", data, "--header-only"], capture_output=True, text=True).stdout
    m = re.search(r"sample_freq \} = (\d+)", header)
    freq = int(m.group(1)) if m else 999
    out = subprocess.run(["perf", "script", "-i", data, "-F", "pid,tid,comm,time,ip,sym"], capture_output=True,
                         text=True).stdout
    samples = []
    threads = collections.defaultdict(set)
    window = [float("inf"), 0.0]
    for line in out.splitlines():
        m = re.match(r"\s*(.*?)\s+(\d+)/(\d+)\s+([0-9.]+):\s+[0-9a-f]+\s*(.*)$", line)
        if not m:
            continue
        comm, pid, t, sym = m.group(1), int(m.group(2)), float(m.group(4)), m.group(5).strip()
        samples.append((comm, pid, t, sym))
        threads[pid].add(comm)
        if comm.startswith(("lm-write", "lm-data")):
            window = [min(window[0], t), max(window[1], t)]

    def side(comm, pid):
        names = threads[pid]
        src = any(n.startswith(SOURCE_THREADS) for n in names)
        dst = any(n.startswith(DEST_THREADS) for n in names)
        if src and dst:  # one process holding both sides (demo): split by thread
            if comm.startswith(DEST_THREADS) or comm in ("lm-dest", "lm-control"):
                return "destination"
            return "source"
        if src:
            return "source"
        if dst:
            return "destination"
        if comm.startswith("ksoftirqd"):
            return "softirq threads"
        return None

    table = collections.defaultdict(collections.Counter)
    others = collections.defaultdict(collections.Counter)
    for comm, pid, t, sym in samples:
        s = side(comm, pid)
        if s and window[0] <= t <= window[1]:
            table[s][category(sym)] += 1
            if category(sym) == "other":
                others[s][f"{comm}: {sym}"] += 1
    names = [n for n, _ in CATEGORIES] + ["other"]
    print(f"migration window {window[1] - window[0]:.2f} s, {freq} Hz")
    for s in ("source", "destination", "softirq threads"):
        c = table.get(s)
        if not c:
            continue
        total = sum(c.values())
        parts = ", ".join(f"{n} {c[n] / freq:.2f}" for n in names if c[n])
        print(f"{s}: {total / freq:.2f} CPU-s ({parts})")
        for what, n in others[s].most_common(int(sys.argv[2]) if len(sys.argv) > 2 else 0):
            print(f"    other: {n / freq:.3f} {what}")


if __name__ == "__main__":
    main()
