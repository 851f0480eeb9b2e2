"""`make repro`'s wrapper runs each dvc command in a process group of its own, with a watchdog in that
group. Ctrl-C reaches the whole group, the watchdog included, at any moment, even while its Python
still starts (the race a CI run met: the wrapper then died on a broken pipe instead of naming the
command that puts the outputs back)."""

import os
import signal
import threading
import time

from unpaired.repro import Signals, _run_dvc


def test_ctrl_c_to_dvcs_group_as_it_starts_leaves_the_watchdog_alive(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(3):
        signals = Signals()
        sent = []

        def interrupt_at_once(signals=signals, sent=sent):  # this iteration's, bound now
            deadline = time.monotonic() + 10
            while signals.group is None and time.monotonic() < deadline:
                pass  # spin: signal within microseconds of the start
            group = signals.group
            for _ in range(20):  # again and again while the watchdog starts up
                try:
                    os.killpg(group, signal.SIGINT)
                except (ProcessLookupError, TypeError):
                    break
                sent.append(group)
                time.sleep(0.005)

        thread = threading.Thread(target=interrupt_at_once)
        thread.start()
        status = _run_dvc(["version"], signals)  # raised BrokenPipeError when the watchdog died
        thread.join()
        assert sent, "the test never reached dvc's process group"
        assert status != 0  # dvc itself was interrupted
