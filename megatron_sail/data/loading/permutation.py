"""A seeded permutation of [0, n) evaluated one index at a time, in O(1) time and memory.

The blend (dataset.py) needs "row perm(seed, d, epoch)[j] of dataset d" for any j. Building
the permutation (n int64s) costs O(n) time and 8n bytes per (dataset, epoch): at 100M rows that
is 800 MB and seconds per source, and a blend over more sources than a cache holds rebuilds one
per row. Here the permutation is never built: ``FeistelPermutation(n, key)(i)`` computes where
i goes with a Feistel network on the b-bit integers (b = bits of n - 1, so the domain
[0, 2^b) is less than 2n), split into a high and a low half that take turns being XORed with a
keyed hash of the other, and walks the cycle until the value lands in [0, n) ("cycle
walking"). Each round is its own inverse, so the network is a bijection whatever the hash, and
cycle walking keeps it one on [0, n): every epoch still visits each row exactly once. Expected
passes per index: 2^b / n < 2.
"""

from __future__ import annotations

_M64 = (1 << 64) - 1
ROUNDS = 6
"""Feistel rounds: 4 already make a keyed pseudo-random permutation (Luby-Rackoff); 6 leave
margin for the simple round function."""


def mix64(x: int) -> int:
    """splitmix64's finalizer: a fast 64-bit bit mixer (every input bit moves every output bit)."""
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """One 64-bit key from integers (seed, dataset, epoch, ...), order-sensitive."""
    h = 0x243F6A8885A308D3
    for p in parts:
        h = mix64(h ^ (int(p) & _M64))
    return h


class FeistelPermutation:
    """Bijection on [0, n) fixed by (n, key); ``perm(i)`` is O(1) time, the object O(1) memory."""

    def __init__(self, n: int, key: int):
        if n < 1:
            raise ValueError(f"permutation of an empty range (n={n})")
        self.n = int(n)
        bits = max(1, (self.n - 1).bit_length())
        self.low_bits = bits - bits // 2
        self.low_mask = (1 << self.low_bits) - 1
        self.high_mask = (1 << (bits // 2)) - 1
        self.keys = tuple(derive_key(key, r) for r in range(ROUNDS))

    def _encrypt(self, x: int) -> int:
        """One pass of the network over [0, 2^bits): each round XORs one half with a keyed hash
        of the other (an involution, so the whole pass is a bijection, also for unequal halves)."""
        lb, lm, hm = self.low_bits, self.low_mask, self.high_mask
        high, low = x >> lb, x & lm
        for r, k in enumerate(self.keys):
            if r & 1:
                low ^= mix64(k ^ high) & lm
            else:
                high ^= mix64(k ^ low) & hm
        return (high << lb) | low

    def __call__(self, i: int) -> int:
        """Where index i goes."""
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range [0, {self.n})")
        x = self._encrypt(i)
        while x >= self.n:  # cycle walking: the cycle through i returns to [0, n) eventually
            x = self._encrypt(x)
        return x
