"""Background sampling of memory and utilization: NVML on GPUs, the process's CPU and RSS on CPU."""

from __future__ import annotations

import threading
import time

import torch


class NvmlDevice:
    """NVML handle of the current CUDA device (matched by UUID, so CUDA_VISIBLE_DEVICES is respected)."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        try:
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
            self.handle = pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        except Exception:
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())

    def util_pct(self) -> float:
        return float(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def mem_used_gib(self) -> float:
        return self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used / 2**30

    def sm_clock_mhz(self) -> float | None:
        return self._optional(lambda: float(self.nvml.nvmlDeviceGetClockInfo(self.handle, self.nvml.NVML_CLOCK_SM)))

    def power_w(self) -> float | None:
        return self._optional(lambda: self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0)

    def _optional(self, read):
        """A reading some cards or drivers do not support is None, not a lost sample row."""
        try:
            return read()
        except self.nvml.NVMLError:
            return None


def nvml_device():
    """(device, None) or (None, reason) when NVML is unavailable."""
    if not torch.cuda.is_available():
        return None, "no CUDA device (CPU run): utilization is the process CPU percent"
    try:
        return NvmlDevice(), None
    except Exception as exc:  # NVMLError_LibraryNotFound and friends
        return None, f"NVML unavailable: {type(exc).__name__}: {exc}"


class Sampler(threading.Thread):
    """Samples every ``period_s`` until stopped. Rows: t_s, rank, mem_gib, util_pct (+ kind labels)."""

    def __init__(self, rank: int, t0: float, offset_s: float, period_s: float):
        super().__init__(daemon=True, name="llmpar-sampler")
        self.rank, self.t0, self.offset, self.period = rank, t0, offset_s, period_s
        self.rows: list[dict] = []
        self._stop_event = threading.Event()
        self.cuda = torch.cuda.is_available()
        self.nvml, self.nvml_reason = nvml_device()
        if not self.cuda:
            import psutil

            self.proc = psutil.Process()
            self.proc.cpu_percent(None)

    def sample(self) -> dict:
        row = {"t_s": time.time() - self.t0 + self.offset, "rank": self.rank}
        if self.cuda:
            row["mem_gib"] = torch.cuda.memory_allocated() / 2**30
            row["util_pct"] = self.nvml.util_pct() if self.nvml else None
            row["device_mem_used_gib"] = self.nvml.mem_used_gib() if self.nvml else None
            # a card that computes more slowly under load (power or thermal limits) shows it here
            row["sm_clock_mhz"] = self.nvml.sm_clock_mhz() if self.nvml else None
            row["power_w"] = self.nvml.power_w() if self.nvml else None
        else:
            row["mem_gib"] = self.proc.memory_info().rss / 2**30
            row["util_pct"] = self.proc.cpu_percent(None)
        return row

    def run(self):
        while not self._stop_event.wait(self.period):
            try:
                self.rows.append(self.sample())
            except Exception:  # a failed sample must never kill training
                pass

    def stop(self) -> list[dict]:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        return self.rows
