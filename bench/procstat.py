"""Memory figures of a running process, from Linux's /proc (shared by the benchmarks)."""


def peak_rss_mb(pid):
    """The process's peak resident memory (VmHWM) in MB; NaN if /proc does not say."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss(pid):
    """Starts a new peak (VmHWM) from the current resident size; ignored where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
