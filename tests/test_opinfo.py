"""PyTorch's OpInfo and ModuleInfo databases on remote_accelerator against eager CPU.

Every entry runs in a child process (Note: [Conformance in child processes] in
genie/conformance.py), so an op that kills its process fails that entry and the run goes on.
CI runs a fixed stride of the entries; ``bench/bench_opinfo.py`` runs them all and writes the
table the README shows.
"""

from __future__ import annotations

import os

import pytest

from genie import conformance

# Every STRIDE-th entry of (OpInfo op x dtype, ModuleInfo module x eval/train, OpInfo grad):
# about 450 entries, under three minutes on two cores.
STRIDE = 9
PASS_RATE_FLOOR = 0.99


@pytest.mark.slow
def test_opinfo_and_moduleinfo_stride_match_eager(capsys):
    """No entry crashes its process or hangs, and at least 99% of the entries equal eager CPU
    (bitwise, or within the dtype's assert_close tolerance)."""
    todo = conformance.entries(("op", "module", "grad"))[::STRIDE]
    outcomes = conformance.run(todo, jobs=min(2, os.cpu_count() or 1), timeout=240)
    tried = [o for o in outcomes if o.status != "skip"]
    passed = [o for o in tried if o.status == "pass"]
    broken = [o for o in tried if o.status in ("crash", "timeout")]
    failed = [o for o in tried if o.status != "pass"]
    rate = len(passed) / max(len(tried), 1)
    with capsys.disabled():
        print(
            f"\nOpInfo/ModuleInfo stride {STRIDE}: {len(passed)}/{len(tried)} entries match eager CPU ({rate:.1%})"
        )
        for o in failed:
            print(f"  {o.status.upper()} {o.entry.label}: {o.reason[:160]}")
    assert len(tried) >= 300
    assert not broken, [f"{o.entry.label}: {o.reason}" for o in broken]
    assert rate >= PASS_RATE_FLOOR, [f"{o.entry.label}: {o.reason}" for o in failed]


def test_a_crashing_entry_fails_alone():
    """A worker that dies mid-entry reports that entry as a crash; the next entry still runs."""
    todo = [
        conformance.Entry("op", "add", "", "float32"),
        conformance.Entry("op", "add", "", "int64"),
    ]
    worker = conformance._Worker()
    try:
        worker.proc.kill()  # as a segfault would, before the entry answers
        worker.proc.wait()
        first = worker.ask(todo[0], timeout=60)
    finally:
        worker.kill()
    assert first.status == "crash"
    (second,) = conformance.run(todo[1:], jobs=1, timeout=120)
    assert second.status == "pass" and second.samples > 0


def test_an_entry_that_overruns_is_a_timeout():
    """An entry with no answer in time is reported as a timeout and its worker is stopped."""
    worker = conformance._Worker()
    try:
        outcome = worker.ask(conformance.Entry("op", "add", "", "float32"), timeout=0.05)
    finally:
        worker.kill()
    assert outcome.status == "timeout"
    assert not worker.alive()


@pytest.mark.slow
def test_opinfo_stride_through_a_loopback_server_never_takes_the_server_down(capsys, monkeypatch):
    """The OpInfo programs sent through `genie serve` (every worker connects to one loopback
    server): no entry crashes its worker or the server, at least 99% equal eager CPU, and the
    server still answers afterwards."""
    from genie.runtime.loopback import LoopbackServer

    with LoopbackServer(threads=1) as srv:
        monkeypatch.setenv("GENIE_SERVER", srv.address)
        monkeypatch.setenv("GENIE_TOKEN", srv.token)
        todo = conformance.entries(("op",))[::25]
        outcomes = conformance.run(todo, jobs=min(2, os.cpu_count() or 1), timeout=240)
        alive = srv.alive()
    tried = [o for o in outcomes if o.status != "skip"]
    passed = [o for o in tried if o.status == "pass"]
    rate = len(passed) / max(len(tried), 1)
    with capsys.disabled():
        print(f"\nOpInfo through a server: {len(passed)}/{len(tried)} entries match ({rate:.1%})")
    assert alive, "the server died"
    assert len(tried) >= 100
    assert not [o for o in tried if o.status in ("crash", "timeout")]
    assert rate >= PASS_RATE_FLOOR, [
        f"{o.entry.label}: {o.reason}" for o in tried if o.status != "pass"
    ]
