"""Per-GPU used memory during a benchmark run (nvidia-smi, else pynvml), and the planner's estimate
for each GPU next to the measured peak (experiments/bench/four_gpu.py)."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path

SAMPLE_QUERY = "index,uuid,memory.used,memory.total"


class GpuSampler:
    """Per-GPU used memory every `period_ms` into a CSV file (nvidia-smi, else pynvml in a thread)."""

    def __init__(self, path: Path, period_ms: int = 200):
        self.path, self.period_ms = path, period_ms
        self.proc = self.thread = None
        self.stop_event = threading.Event()
        self.marks: dict[str, int] = {}
        self.backend = None

    def start(self) -> GpuSampler:
        self.sink = open(self.path, "w")  # noqa: SIM115  (closed in stop)
        if shutil.which("nvidia-smi"):
            cmd = [
                "nvidia-smi",
                f"--query-gpu={SAMPLE_QUERY}",
                "--format=csv,noheader,nounits",
                "-lms",
                str(self.period_ms),
            ]
            self.proc = subprocess.Popen(cmd, stdout=self.sink, stderr=subprocess.DEVNULL)
            self.backend = "nvidia-smi"
        else:
            try:
                import pynvml

                pynvml.nvmlInit()
            except Exception as exc:  # noqa: BLE001
                print(f"warning: no nvidia-smi and no pynvml ({exc}): GPU memory is not sampled", flush=True)
                return self
            self.thread = threading.Thread(target=self._nvml, args=(pynvml,), daemon=True)
            self.thread.start()
            self.backend = "pynvml"
        return self

    def _nvml(self, nvml) -> None:
        while not self.stop_event.wait(self.period_ms / 1000):
            for i in range(nvml.nvmlDeviceGetCount()):
                h = nvml.nvmlDeviceGetHandleByIndex(i)
                uuid = nvml.nvmlDeviceGetUUID(h)
                mem = nvml.nvmlDeviceGetMemoryInfo(h)
                self.sink.write(
                    f"{i}, {uuid if isinstance(uuid, str) else uuid.decode()}, {mem.used >> 20}, {mem.total >> 20}\n"
                )
            self.sink.flush()

    def mark(self, name: str) -> None:
        """Samples before this point belong to the earlier phase."""
        self.sink.flush()
        self.marks[name] = self.path.stat().st_size

    def stop(self) -> dict:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        self.sink.close()
        return self.peaks()

    def peaks(self) -> dict:
        text = self.path.read_text() if self.path.exists() else ""
        out = {"backend": self.backend, "period_ms": self.period_ms, "all": parse_samples(text)}
        if "steps" in self.marks:
            out["steps"] = parse_samples(text[self.marks["steps"] :])
        if "roles" in self.marks:
            out["idle"] = parse_samples(text[: self.marks["roles"]], reduce=min)
        return out


class HostSampler:
    """Peak used host memory (psutil: total - available) every `period_ms`, in a thread."""

    def __init__(self, period_ms: int = 200):
        self.period_ms, self.peak_gb, self.start_gb = period_ms, 0.0, None
        self.stop_event = threading.Event()
        self.thread = None

    def start(self) -> HostSampler:
        import psutil

        def used() -> float:
            vm = psutil.virtual_memory()
            return (vm.total - vm.available) / 1e9

        def loop() -> None:
            while not self.stop_event.wait(self.period_ms / 1000):
                self.peak_gb = max(self.peak_gb, used())

        self.start_gb = used()
        self.thread = threading.Thread(target=loop, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> dict:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)
        return {"peak_gb": round(self.peak_gb, 2), "before_gb": round(self.start_gb or 0.0, 2)}


def parse_samples(text: str, reduce=max) -> dict[int, dict]:
    """nvidia-smi `index, uuid, memory.used, memory.total` lines -> {index: {uuid, mib, total_mib,
    samples}} with the peak (or `reduce`) of memory.used; partial or unreadable lines are skipped."""
    gpus: dict[int, dict] = {}
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            index, uuid, used, total = int(parts[0]), parts[1], float(parts[2]), float(parts[3])
        except ValueError:  # "[N/A]", a cut line
            continue
        g = gpus.setdefault(index, {"uuid": uuid, "mib": used, "total_mib": total, "samples": 0})
        g["mib"] = reduce(g["mib"], used)
        g["samples"] += 1
    return gpus


def _gb(mib: float) -> float:
    return mib * 2**20 / 1e9  # the plan's estimates are params x bytes / 1e9


def pair_with_plan(plan, measured: dict[int, dict], learner_uuids=None, worker_uuids=None) -> list[dict]:
    """One row per planned GPU: the plan's estimate next to the measured peak of the physical GPU.

    Ray, not the plan, picks the physical GPU of a bundle, so plan GPUs are matched through the CUDA
    UUIDs that learner rank r and the workers of engine k report (the reference and reward model
    share the learner's bundles); without UUIDs, plan GPU i is taken to be nvidia-smi index i."""
    by_uuid = {g["uuid"]: (i, g) for i, g in measured.items()}
    uuid_of: dict[tuple[str, int], str] = {}
    for r, a in enumerate(plan.assignments.get("learner", [])):
        if learner_uuids and r < len(learner_uuids) and learner_uuids[r]:
            uuid_of[(a.node, a.gpus[0])] = learner_uuids[r]
    for k, a in enumerate(plan.assignments.get("rollout", [])):
        workers = worker_uuids[k] if worker_uuids and k < len(worker_uuids) else []
        for j, g in enumerate(a.gpus):
            if j < len(workers) and workers[j]:
                uuid_of[(a.node, g)] = workers[j]
    rows = []
    for (node, gpu), (est, cap) in sorted(plan.gpu_memory_usage().items()):
        roles = [
            f"{role}[{a.replica}]"
            for role in plan.roles
            for a in plan.assignments[role]
            if a.node == node and gpu in a.gpus
        ]
        uuid = uuid_of.get((node, gpu))
        index, g = by_uuid.get(uuid, (None, None)) if uuid else (gpu, measured.get(gpu))
        row = {
            "node": node,
            "plan_gpu": gpu,
            "roles": roles,
            "estimate_gb": round(est, 2),
            "capacity_gb": cap,
            "paired_by": "uuid" if uuid else "index",
            "gpu_index": index,
            "uuid": g["uuid"] if g else uuid,
        }
        if g:
            row["measured_peak_gb"] = round(_gb(g["mib"]), 2)
            row["measured_total_gb"] = round(_gb(g["total_mib"]), 2)
            row["measured_over_estimate"] = round(_gb(g["mib"]) / est, 3) if est else None
        rows.append(row)
    return rows


def gpu_memory_used_mib() -> list[float]:
    if not shutil.which("nvidia-smi"):
        return []
    p = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    )
    return [float(x) for x in p.stdout.split() if x.replace(".", "").isdigit()]


def wait_gpus_free(limit_s: float = 45, below_mib: float = 2048) -> float:
    """Until every GPU is (nearly) empty again: a previous run's engine processes may still be
    exiting, and vLLM refuses to start when less than its share of the memory is free."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        used = gpu_memory_used_mib()
        if not used or max(used) < below_mib:
            break
        time.sleep(1)
    return time.perf_counter() - t0
