"""Host-side bookkeeping of the fast engine's paged KV cache: free blocks, and how many tables hold each.

The G samples of a prompt hold the blocks of its prefix together (each a reference); a block goes back to
the free list when the last table holding it lets go. Block 0 is the sink: it is never handed out, and
every table entry not yet given a block points there."""

from __future__ import annotations


class Blocks:
    def __init__(self, n: int):
        self.free = list(range(n - 1, 0, -1))  # popped from the end: low ids first
        self.refs = [0] * n

    def extend(self, more: int) -> None:
        """The pool grew by `more` blocks at the end."""
        n = len(self.refs)
        self.free = list(range(n + more - 1, n - 1, -1)) + self.free
        self.refs += [0] * more

    def __len__(self) -> int:
        return len(self.free)

    def take(self, k: int) -> list[int]:
        if k > len(self.free):
            raise MemoryError(f"{k} KV blocks wanted, {len(self.free)} free")
        got = [self.free.pop() for _ in range(k)]
        for b in got:
            self.refs[b] = 1
        return got

    def hold(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] += 1

    def drop(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free.append(b)
