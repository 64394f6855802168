"""Uploads begun at .to() (Note: [Early uploads] in runtime/remote/early.py): what a user sees
is what the flush-time upload gave (the value at .to(), its error at the flush that needs it),
and a serving loop with a fresh input every call starts early on the server."""

from __future__ import annotations

import copy
import logging
import os
import signal

import fakes
import pytest
import torch
from remote_fixtures import DEVICE

import genie
from genie.errors import GenieError, RemoteError
from genie.runtime.loopback import LoopbackServer
from genie.runtime.remote import connect

pytest_plugins = ["remote_fixtures"]

# Below and above GENIE_EARLY_INLINE: sent inside .to() by the recording thread, and (over a
# transport without a native writer: Note: [Background sends]) by the sender thread.
SIZES = [pytest.param(48, id="inline"), pytest.param(1 << 17, id="large")]


@pytest.mark.parametrize("n", SIZES)
def test_an_in_place_write_after_to_does_not_change_the_remote_value(remote, n):
    x = torch.randn(n)
    before = x.clone()
    rx = x.to(DEVICE)
    x.mul_(-3).add_(7)  # the user reuses the CPU buffer before anything is flushed
    assert torch.equal((rx * 2).cpu(), before * 2)
    assert torch.equal(rx.cpu(), before)
    assert remote.counters["uploads_early"] >= 1


@pytest.mark.parametrize("n", [48, 1 << 20])
def test_a_cpu_tensor_mixed_into_remote_ops_starts_uploading_before_the_flush(remote, n):
    """The logical-device rule makes a CPU operand a graph input; its upload begins when the
    op is recorded, and the result is eager's."""
    w = torch.randn(n)
    rw = w.to(DEVICE)
    x = torch.randn(n)
    before = remote.counters["uploads_early"]
    y = rw * x  # x stays on the CPU
    assert remote.counters["uploads_early"] == before + 1  # nothing flushed yet
    assert torch.equal(y.cpu(), w * x)


@pytest.mark.parametrize("n", [48, 1 << 20])
def test_a_cpu_operand_written_in_place_before_the_flush_is_still_refused(remote, n):
    """An early upload of a CPU operand is not a snapshot: writing the operand in place
    before the work ran raises at the flush as it did without early uploads, whatever bytes
    already went, and the session goes on."""
    w = torch.randn(n)
    rw = w.to(DEVICE)
    x = torch.randn(n)
    y = rw + x
    x.add_(1)
    with pytest.raises(GenieError, match="modified in place before the work ran"):
        y.cpu()
    z = torch.randn(n)
    assert torch.equal((rw + z).cpu(), w + z)


@pytest.mark.parametrize("n", SIZES)
def test_a_copy_into_a_remote_tensor_keeps_the_value_at_the_copy(remote, n):
    x = torch.randn(n)
    before = x.clone()
    rz = torch.zeros(n, device=DEVICE)
    rz[: n // 2].copy_(x[: n // 2])  # not the whole storage: recorded as a copy node
    x.zero_()
    expected = torch.cat([before[: n // 2], torch.zeros(n - n // 2)])
    assert torch.equal(rz.cpu(), expected)


def test_a_failed_early_upload_raises_at_the_flush_that_needs_it_and_the_session_goes_on():
    """Over the session's memory limit the upload sent at .to() fails; the flush that reads it
    raises that upload's error (not a confusing "not resident"), a flush that does not read it
    runs, and so does the next request in the same session."""
    with LoopbackServer(memory_limit="1MiB", threads=1) as srv:
        client = connect(srv.address, token=srv.token)
        try:
            big = torch.randn(1 << 19)  # 2 MiB
            rbig = big.to(DEVICE)
            small = torch.randn(16)
            assert torch.equal((small.to(DEVICE) + 1).cpu(), small + 1)  # does not need rbig
            with pytest.raises(RemoteError, match=r"upload of a tensor of shape \[524288\]"):
                (rbig * 2).cpu()
            with pytest.raises(RemoteError, match="limit"):
                rbig.sum().cpu()  # every later flush that reads it says the same
            del rbig
            genie.synchronize()
            z = torch.randn(32, 8)
            assert torch.equal((z.to(DEVICE) @ z.t().to(DEVICE)).cpu(), z @ z.t())
            assert client.counters["uploads_early"] >= 3
        finally:
            genie.configure(local_device="cpu")
            client.close()


def test_a_tensor_dropped_before_its_flush_holds_no_server_memory(remote):
    """Uploads begun at .to() of tensors the program never used are freed on the server."""
    for _ in range(12):
        r = torch.randn(1 << 16).to(DEVICE)  # 256 KiB each, never used
        del r
    x = torch.randn(8)
    assert torch.equal((x.to(DEVICE) * 3).cpu(), x * 3)
    assert remote.server_stats()["session"]["resident_bytes"] < 4 * (1 << 18)


def test_early_uploads_can_be_switched_off(server):
    client = connect(server.address, token=server.token, early_uploads=False)
    try:
        x = torch.randn(64)
        assert torch.equal((x.to(DEVICE) + 1).cpu(), x + 1)
        assert client.counters["uploads_early"] == 0
        assert client.counters["upload_bytes"] == x.nbytes
    finally:
        genie.configure(local_device="cpu")
        client.close()


@torch.no_grad()
def test_serving_with_a_fresh_input_every_call_starts_early_and_equals_eager(remote):
    """A new input uploaded at .to() every call: from the fourth call on, the server starts
    the program as soon as the input has landed (Note: [Client speculation]) and the run at
    the flush adopts it; every result equals eager."""
    model = fakes.bert()
    rmodel = fakes.bert().to(DEVICE)
    torch.manual_seed(0)
    for _ in range(8):
        x = torch.randint(0, 500, (2, 12))
        assert torch.equal(rmodel(x.to(DEVICE)).pooler_output.cpu(), model(x).pooler_output)
    assert remote.counters["spec_hits"] >= 4
    assert remote.server_stats()["session"]["spec_misses"] == 0


@torch.no_grad()
def test_a_steady_serving_loop_guesses_at_the_upload_and_an_alternating_one_does_not(server):
    """Note: [Guessing at the upload]: once two requests in a row began with one upload and
    ran the same program, the next guess goes with the upload, before the forward's first
    nodes are recorded; two models taken in turns never agree twice, so they never guess so.
    Every such guess is right and every result equals eager."""
    a, b = fakes.bert(), fakes.gpt2()
    client = connect(server.address, token=server.token)
    try:
        ra, rb = fakes.bert().to(DEVICE), fakes.gpt2().to(DEVICE)
        torch.manual_seed(2)
        for i in range(8):
            x = torch.randint(0, 500, (2, 12))
            model, rmodel = (a, ra) if i % 2 else (b, rb)
            assert torch.equal(rmodel(x.to(DEVICE))[0].cpu(), model(x)[0])
        assert client.counters["spec_at_upload"] == 0
        misses = 0
        for i in range(8):
            x = torch.randint(0, 500, (2, 12))
            assert torch.equal(ra(x.to(DEVICE)).pooler_output.cpu(), a(x).pooler_output)
            if i == 1:  # the guesses at the upload begin with the next request
                misses = client.server_stats()["session"]["spec_misses"]
        assert client.counters["spec_at_upload"] == 6
        assert client.server_stats()["session"]["spec_misses"] == misses
    finally:
        genie.configure(local_device="cpu")
        client.close()


@torch.no_grad()
def test_a_guess_at_the_upload_releases_the_outputs_the_user_dropped(server):
    """A loop that keeps the last output while it runs the next (a decode loop's logits):
    the guess made at the upload carries the release of the output dropped since the last
    flush, so that the server's run (a CUDA graph replay, on a GPU) finds it released rather
    than held, and need not copy it away first. Every result equals eager."""
    from genie.runtime import protocol as P

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16))
    xs = [torch.randn(4, 16) for _ in range(8)]
    client = connect(server.address, token=server.token)
    specs: list[dict] = []
    t = client.channel.t
    send_frame = t.send_frame

    def spy(version, kind, header, buffers=(), **kw):
        h = P.unpack(header)
        if h.get("t") == "spec":
            specs.append(h)
        return send_frame(version, kind, header, buffers, **kw)

    t.send_frame = spy
    try:
        rmodel = copy.deepcopy(model).to(DEVICE)
        prev = None
        for i, x in enumerate(xs):
            out = rmodel(x.to(DEVICE))
            assert torch.equal(out.cpu(), model(x))
            if prev is not None:  # held while this call ran
                assert torch.equal(prev.cpu(), model(xs[i - 1]))
            prev = out  # the one before is dropped here
        assert client.counters["spec_at_upload"] >= 3
        assert specs, "no guess was sent"
        for h in specs:  # each guess releases what the user dropped (the output before last)
            released = [i for op in h.get("pre", []) if op[0] == "release" for i in op[1]]
            assert len(released) == 1, h.get("pre")
        assert client.server_stats()["session"]["spec_misses"] == 0
    finally:
        t.send_frame = send_frame
        genie.configure(local_device="cpu")
        client.close()


def test_a_host_mask_indexes_a_remote_tensor_through_a_server(remote):
    """Boolean indexing with a CPU mask runs on the server at once: the mask is uploaded for
    it and stays until it has run (Note: [Inputs of an op run at once])."""
    a = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    x = a.to(DEVICE)
    for k in range(3):
        mask = torch.tensor([True, False, k > 0, True, False, k > 1])
        assert torch.equal(x[mask].cpu(), a[mask])
        assert torch.equal(x, a) and not torch.equal(x, a + 1)


@torch.no_grad()
def test_two_fresh_inputs_whose_second_comes_after_the_window_still_start_early(remote):
    """With input ids and an attention mask both uploaded at .to(), the recording's first
    nodes come before the second upload begins: the guess waits for it, then goes behind it.
    When a request is two flushes (HF's mask check, then the forward that reads what the
    check made), both start early."""
    model = fakes.bert()
    rmodel = fakes.bert().to(DEVICE)
    torch.manual_seed(1)
    for _ in range(8):
        x = torch.randint(0, 500, (2, 12))
        mask = (torch.rand(2, 12) > 0.2).long()
        got = rmodel(x.to(DEVICE), attention_mask=mask.to(DEVICE)).pooler_output.cpu()
        assert torch.equal(got, model(x, attention_mask=mask).pooler_output)
    per_request = remote.counters["flushes"] // 8  # HF's mask check makes it 2
    assert remote.counters["spec_hits"] >= 5 * per_request  # all but the first 3 requests
    assert remote.server_stats()["session"]["spec_misses"] == 0


def test_uploads_still_queued_at_the_flush_show_progress(server, monkeypatch, caplog):
    """What the sender thread has not sent yet goes with the flush, with the progress of
    Note: [Large uploads] (log lines at INFO when stderr is not a terminal)."""
    monkeypatch.setenv("GENIE_UPLOAD_PROGRESS", str(1 << 20))
    client = connect(server.address, token=server.token)
    try:
        monkeypatch.setattr(client.early, "_kick", lambda inline: None)  # nothing sent early
        x = torch.randn(1 << 19)  # 2 MiB
        with caplog.at_level(logging.INFO, logger="genie.runtime.remote.uploads"):
            y = (x.to(DEVICE) * 2).sum().cpu()
        assert torch.equal(y, (x * 2).sum())
        lines = [r.getMessage() for r in caplog.records if "uploaded" in r.getMessage()]
        assert lines and "100%" in lines[-1], caplog.text
        assert client.counters["uploads_early"] == 1
    finally:
        genie.configure(local_device="cpu")
        client.close()


def test_ctrl_c_while_queued_uploads_go_leaves_the_session_working(server, monkeypatch):
    """SIGINT while the flush sends what is still queued: the upload in flight is finished,
    the rest is not sent, KeyboardInterrupt reaches the user; a tensor whose upload never went
    says so when used, and the same session computes on."""
    client = connect(server.address, token=server.token)
    try:
        early = client.early
        monkeypatch.setattr(early, "_kick", lambda inline: None)
        real, sent = early._send, []

        def interrupting(up):
            real(up)
            sent.append(up.sid)
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C now

        monkeypatch.setattr(early, "_send", interrupting)
        a, b = torch.randn(1 << 16), torch.randn(1 << 16)
        ra, rb = a.to(DEVICE), b.to(DEVICE)
        with pytest.raises(KeyboardInterrupt):
            (ra + rb).cpu()
        assert len(sent) == 1  # nothing more went after the interrupt
        monkeypatch.setattr(early, "_send", real)
        with pytest.raises(GenieError, match="interrupted"):
            (rb * 2).cpu()
        z = torch.randn(16, 4)
        assert torch.equal((z.to(DEVICE) @ z.t().to(DEVICE)).cpu(), z @ z.t())
    finally:
        genie.configure(local_device="cpu")
        client.close()


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(64, 32).to(torch.bfloat16), id="bfloat16"),
        pytest.param(lambda: torch.rand(300) > 0.5, id="bool"),
        pytest.param(lambda: torch.randn(96, 64).t(), id="transposed-view"),
        pytest.param(lambda: torch.randn(50, 40)[3:20, ::2], id="strided-slice"),
    ],
)
def test_every_dtype_and_layout_arrives_as_it_was_at_to(remote, make):
    x = make()
    before = x.clone()
    rx = x.to(DEVICE)
    x.zero_() if x.dtype != torch.bool else x.logical_not_()
    assert torch.equal(rx.cpu(), before)


def test_an_upload_made_in_inference_mode_arrives(remote):
    with torch.inference_mode():
        x = torch.randn(128, 16)
        y = (x.to(DEVICE) * 2).cpu()
    assert torch.equal(y, x * 2)
