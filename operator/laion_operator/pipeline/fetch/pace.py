"""How long a body may take: curl's low-speed limit (CURLOPT_LOW_SPEED_LIMIT/_TIME) rather than one
deadline for the whole request, so that a large image served slowly but steadily is kept (as a
per-read timeout keeps it) while a drip-fed body still ends.

A body must bring `rate × window` bytes in every `window` seconds, counted from the request (so the
first window is the old deadline: headers, and a body under `rate × window`, come within it, and a
drip-fed body ends there), and ends by `window + size / rate` from the request at the latest, `size`
being its Content-Length or, when there is none, the most it may be (`maxImageBytes`). The second
follows from the first (a body that keeps the rate is whole by then); it is also enforced on its own,
so that the bound a URL's slot is held for can be read off the spec."""

from __future__ import annotations

from collections import deque


def body_limit(window: float, size: int, rate: float) -> float:
    """The most seconds a request whose body has at most `size` bytes may take."""
    return window + size / rate


class Pace:
    """The sliding window of one body: `deadline` is the loop time by which more bytes must arrive."""

    def __init__(self, rate: float, window: float, start: float):
        self.need = rate * window  # bytes every window must bring
        self.window = window
        self.total = 0
        # (time, bytes so far) after each read, oldest first; only the marks a later window can still
        # start after are kept.
        self.marks: deque[tuple[float, int]] = deque([(start, 0)])

    def add(self, now: float, size: int) -> None:
        self.total += size
        self.marks.append((now, self.total))
        floor = self.total - self.need
        while self.marks[0][1] <= floor:
            self.marks.popleft()

    @property
    def deadline(self) -> float:
        """With no more bytes, the window ending here would hold less than `need`: the first mark
        holding more than `total - need` bytes leaves the window then."""
        return self.marks[0][0] + self.window
