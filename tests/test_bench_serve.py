"""bench/serve.py's CPU split (``CpuMeter``) against a process whose spending is known: it burns
a set amount of CPU in a second thread and in a child process, and nothing in its main thread.
The reference is that plan, checked by the kernel's own per-thread clocks, not the meter's
bookkeeping."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # the benches import each other by name

from serving_harness import CpuMeter  # noqa: E402

BURN_S = 0.6

SERVER = textwrap.dedent(
    f"""
    import multiprocessing, sys, threading, time

    def burn(clock, seconds):
        end = clock() + seconds
        while clock() < end:
            pass

    if __name__ == "__main__":
        go = multiprocessing.Event()
        child = multiprocessing.get_context("fork").Process(
            target=lambda: (go.wait(), burn(time.process_time, {BURN_S}), time.sleep(60))
        )
        child.start()
        thread = threading.Thread(target=lambda: (go.wait(), burn(time.thread_time, {BURN_S})))
        thread.start()
        print("ready", flush=True)
        sys.stdin.readline()  # the first snapshot is taken
        go.set()
        thread.join()
        time.sleep({BURN_S} + 0.5)  # the child burns on the other core meanwhile, then sleeps
        print("done", flush=True)
        sys.stdin.readline()  # the second snapshot is taken
        child.kill()
    """
)


def test_cpu_meter_puts_each_part_of_a_known_spend_where_it_ran():
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        meter = CpuMeter(server.pid)
        time.sleep(0.2)  # the interpreter's start-up is over before the first snapshot
        before = meter.snapshot()
        server.stdin.write("\n")
        server.stdin.flush()
        assert server.stdout.readline().strip() == "done"
        after = meter.snapshot()
        server.stdin.write("\n")
        server.stdin.flush()
    finally:
        server.wait(timeout=30)
    # 1,000 requests: every figure in ms per request equals the part's CPU seconds.
    split = CpuMeter.per_request_ms(before, after, requests=1000)
    assert abs(split["server_other_threads"] - BURN_S) < 0.15
    assert abs(split["server_children"] - BURN_S) < 0.15
    assert split["server_main_thread"] < 0.1
    assert split["rest_of_machine"] > -0.1  # the machine's busy time includes all of the above
    seconds = after["wall"] - before["wall"]
    assert split["busy_cores"] >= 2 * BURN_S / seconds - 0.2
