"""What the client asks the server to start early (Note: [Client speculation]); the client
only sends what the Speculator decides."""

from __future__ import annotations

from collections import OrderedDict

from genie.runtime import protocol as P
from genie.runtime import requests as R
from genie.runtime.remote.namer import MAX_DIGESTS, Known, Sources, Template

__all__ = ["Speculator", "SPECULATION_WINDOW"]

SPECULATION_WINDOW = 2  # recorded nodes compared before a speculative run is asked for


# Note: [Client speculation]
# A program recorded again (the next forward of a serving loop, the next step of a decode loop
# with a static KV cache) is known by its digest, computed in C++ at flush
# (Note: [Program digests] in csrc/capture/digest.h): the client sends its key and binding and
# never converts its nodes. Better still, the server can start it before the recording ends.
# The recorder fingerprints the first few nodes recorded after each flush (the "window"); the
# client remembers which program the recording that began that way became. When a window
# fingerprints like one seen before, the client predicts that program's binding and sends a
# "spec" request without waiting for its answer; the server runs it while the user's Python
# records the rest (Note: [Speculative runs] in server/speculation.py). The run request at
# flush then finds its work done, or, if the program or its binding turned out different, the
# server undoes the speculative run and runs the real one: correctness never rests on the
# guess. The binding is predicted from the last two runs of the program: an input bound to
# the same storage both times (a weight, a static KV cache) keeps it; an input bound to what
# a created storage of the run before held (this step's token, from last step's argmax)
# takes what that storage's counterpart in the last run holds; an input bound both times to the
# k-th upload begun early for its request (Note: [Early uploads] in early.py: a serving loop's
# fresh input, sent at .to(); a request's uploads are those begun since the first flush after
# the previous upload) takes the k-th upload of the request being recorded. When
# the window arrives before that upload has begun (a second input's .to() comes after the
# window), the guess waits and goes as soon as it has: behind the upload, on the same
# connection, so that the server starts the program the moment the input lands. An input
# bound both times to the j-th storage the flush before it created (a request recorded as two
# flushes: HF's attention-mask check, then the forward that reads what it made) takes the j-th
# storage the flush before this one created. Anything else (an upload at the flush) means no
# guess.
#
# Note: [Guessing at the upload]
# A serving loop's request is `.to()` of a fresh input, then the forward. Its window comes only
# once the forward's first nodes are recorded, a few hundred microseconds after the input has
# gone, and the guess waits for it. When the last two requests both began with as many early
# uploads and then ran the same program, the guess goes as soon as this request's uploads have
# begun, behind them on the connection; the window then asks nothing more. A request that turns
# out different costs the server a run it undoes, as any wrong guess does; two requests in a
# row must agree, so a loop that alternates between programs never guesses this way.
class Speculator:
    """Remembers which program followed each recording start and turns that into guesses."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._by_window: OrderedDict[bytes, Known | Template] = OrderedDict()
        self.window: bytes | None = None  # how the recording being flushed began
        self.ahead = False  # a guess went behind the last flush: the next window asks nothing
        self.waiting: tuple[Known | Template, int] | None = None  # a guess and the number of
        # early uploads it binds, until they have begun
        self._uploads_at_window = 0  # uploads begun in this request before its window
        # (uploads before the window, what followed, how many requests in a row began so)
        self._upload_led: tuple[int, Known | Template, int] | None = None

    def on_window(self, window: bytes, uploads: int = 0) -> Known | Template | None:
        """The recording began like `window`, after `uploads` early uploads of its request:
        what followed such a start last time, if a guess should go now."""
        self.window = window
        self.waiting = None
        self._uploads_at_window = uploads
        if self.ahead or not self.enabled:
            return None
        return self._by_window.get(window)

    def ready(self, arrivals: int) -> Known | Template | None:
        """`arrivals` uploads have begun early since the last flush: the guess that waited for
        that many, if one did."""
        waiting = self.waiting
        if waiting is None or arrivals < waiting[1] or not self.enabled:
            return None
        self.waiting = None
        return waiting[0]

    def at_upload(self, uploads: int) -> Known | Template | None:
        """The `uploads`-th early upload of a request began before its recording did: the
        program that followed as many uploads in the last requests, when at least the last two
        agree (Note: [Guessing at the upload])."""
        led = self._upload_led
        if not self.enabled or self.ahead or self.window is not None or led is None:
            return None
        n, follows, times = led
        return follows if n == uploads and times >= 2 else None

    def ran(self, follows: Known | Template) -> None:
        """The flush that just ran is what the current recording start leads to."""
        self.waiting = None
        if self.window is None:
            return
        n, led = self._uploads_at_window, self._upload_led
        if not n:
            self._upload_led = None
        elif led is not None and led[0] == n and led[1] is follows:
            self._upload_led = (n, follows, led[2] + 1)
        else:
            self._upload_led = (n, follows, 1)
        self._by_window[self.window] = follows
        self._by_window.move_to_end(self.window)
        if len(self._by_window) > MAX_DIGESTS:
            self._by_window.popitem(last=False)
        self.window = None

    def guess(
        self,
        follows: Known | Template,
        resident: dict[int, int],
        sources: Sources | None = None,
        wait: bool = False,
    ) -> R.Spec | None:
        """A "spec" request for `follows` (a program, again; or a template's next
        program) with its predicted binding; None when there is no guess. `sources`: where
        the new inputs of the request guessed come from; with `wait`, a guess that binds more
        uploads than have begun waits for them (``ready``)."""
        known = follows
        if isinstance(follows, Template):
            params = follows.predict()
            if params is None:
                return None
            patch, key = follows.name(params)
            ref = P.ProgramRef(key, base=follows.known.key, patch=patch)
            known = follows.known
        else:
            ref = P.ProgramRef(known.key)
        bind = known.predict(resident, sources)
        if type(bind) is int:
            if wait:
                self.waiting = (follows, bind)
            return None
        if bind is None:
            return None
        return R.Spec(ref, bind)
