"""Blocks a reader can date, and the ledger of what the clients were promised.

Every client write fills one whole block with a record -- magic, block
number, client, counter -- repeated (the pattern of ``tests/workload.py``),
and a client writes only its own blocks, each with a counter larger than
the last.  So any block of any image says which write it holds, or that it
holds none (the image's first content), or that it is torn (a bug: no
write is ever half-performed here).

The :class:`Ledger` keeps, per block, the counters ever sent and two floors:

* ``floor``: the newest write acknowledged -- what a read must see, and
  what the node with control must hold while nothing crashed;
* ``durable``: the newest write acknowledged before an acknowledged FLUSH,
  or with FUA -- what must survive any crash.

A power cut on the node that owns the image takes ``floor`` back to
``durable`` (NBD lets a write acknowledged without a FLUSH be lost then).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

__all__ = ["BLOCK", "Ledger", "Verdict", "block_bytes", "decode"]

BLOCK: Final = 4096
_RECORD: Final = struct.Struct(">8sIII")  # magic, block, client, counter: 20 bytes
_MAGIC: Final = b"FERRYSIM"
_ZEROES: Final = bytes(BLOCK)


def block_bytes(block: int, client: int, counter: int) -> bytes:
    record = _RECORD.pack(_MAGIC, block, client, counter)
    return (record * (BLOCK // len(record) + 1))[:BLOCK]


def decode(data: bytes) -> tuple[int, int, int] | None:
    """(block, client, counter) of a block this workload wrote, else None."""
    if len(data) != BLOCK or data[:8] != _MAGIC:
        return None
    _, block, client, counter = _RECORD.unpack_from(data)
    if data != block_bytes(block, client, counter):
        return None
    return block, client, counter


@dataclass(frozen=True)
class Verdict:
    """What is wrong with one block (``ok`` when nothing is)."""

    ok: bool
    detail: str = ""


class Ledger:
    """What was sent and acknowledged, per block; see the module doc."""

    def __init__(self, blocks: int, initial: bytes) -> None:
        self.blocks = blocks
        self.initial = initial
        self.sent: list[set[int]] = [set() for _ in range(blocks)]
        self.floor = [0] * blocks
        self.durable = [0] * blocks
        self.epoch = 0  # bumped at every power cut of the owner

    # -- what the clients report --------------------------------------------------------

    def sending(self, block: int, counter: int) -> None:
        self.sent[block].add(counter)

    def acknowledged(self, block: int, counter: int, *, fua: bool, epoch: int) -> None:
        """A write sent in ``epoch`` was acknowledged.

        An acknowledgement can be on the wire when the owner loses power: a
        write it acknowledged without FUA may be gone, so it promises
        nothing once the epoch has moved on.  With FUA it was synced first.
        """
        if fua:
            self.durable[block] = max(self.durable[block], counter)
        if fua or epoch == self.epoch:
            self.floor[block] = max(self.floor[block], counter)

    def flushed(self, snapshot: dict[int, int], epoch: int) -> None:
        """A FLUSH sent when ``snapshot`` was the floor of its blocks was acknowledged."""
        if epoch != self.epoch:
            return  # the owner lost power since: what it covered may be gone
        for block, counter in snapshot.items():
            self.durable[block] = max(self.durable[block], counter)

    def power_cut(self) -> None:
        """The owner lost power: only what was durable must still be there."""
        self.epoch += 1
        self.floor = list(self.durable)

    # -- judging an image ---------------------------------------------------------------

    def judge(self, block: int, data: bytes, floor: int) -> Verdict:
        """Whether ``data``, read from ``block``, holds a write at least as new as ``floor``."""
        if data == self.initial[block * BLOCK : (block + 1) * BLOCK]:
            if floor == 0:
                return Verdict(True)
            return Verdict(False, f"block {block}: first content, but write {floor} was promised")
        record = decode(data)
        if record is None:
            what = "zeroes" if data == _ZEROES else "neither a write nor its first content"
            wanted = f"write {floor} was promised" if floor else "its first content was expected"
            return Verdict(False, f"block {block}: {what}, but {wanted}")
        number, _client, counter = record
        if number != block or counter not in self.sent[block]:
            return Verdict(False, f"block {block}: holds write {counter} of block {number}")
        if counter < floor:
            return Verdict(False, f"block {block}: holds write {counter}, {floor} was promised")
        return Verdict(True)

    def judge_image(self, image: bytes | bytearray, floors: list[int]) -> Verdict:
        for block in range(self.blocks):
            start = block * BLOCK
            verdict = self.judge(block, bytes(image[start : start + BLOCK]), floors[block])
            if not verdict.ok:
                return verdict
        return Verdict(True)
