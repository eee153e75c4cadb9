"""Stop strings: end the reply where one appears, and never send any part of it."""


class StopWatch:
    """Streamed text, passed on as soon as no stop string can start in it.

    A stop string can arrive split over tokens, so the tail of the text that
    could still become one is held back until the next piece decides it.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """The part of ``text`` (with what was held back) that is safe to send."""
        self.pending += text
        found = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if found:
            safe, self.pending, self.stopped = self.pending[: min(found)], "", True
            return safe
        hold = self._held()
        safe, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return safe

    def flush(self) -> str:
        """What was held back, once the reply has ended without a stop string."""
        rest, self.pending = self.pending, ""
        return rest

    def _held(self) -> int:
        """Length of the longest tail of the pending text that begins some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(stop[:n]):
                    longest = n
                    break
        return longest
