"""The receiver's half of one transfer's messages: ``Landing`` posts the receives, and hashes and places
each message as it lands, in order (``pair.message_plan`` says what each message holds).

A message that is one run of consecutive destination pages of one pool is received straight into them,
but only once an earlier message of its layer has landed: the sender hands a layer over whole, so the
rest of it is already on its way and ``KVReceiver.release`` (which must wait for receives posted into the
pages: they cannot be recalled) never waits for a layer still being computed. It is hashed in place. The
first message of each layer, and any that is not such a run, lands in a staging buffer and is hashed and
scattered block by block. The sender's checksum comes last, as one more message.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from .pages import CachePages, Checksum, StagingPool
from .pair import (DIGEST_BYTES, SENDER_RANK, Announcement, Message, PairGroup, decode_digest, message_plan,
                   peer_error, tag, wait_work)
from .state import KVPoll


class Landing:
    """One transfer's receives. ``t``: the receiver's ``_Expected`` (pages, ``lock``, ``released``,
    ``in_place``, ``writing``, ``status``); ``write``: False to drain (hash, never place)."""

    def __init__(self, t, ann: Announcement, group: PairGroup, pages: CachePages, staging: StagingPool,
                 write: bool, window_bytes: int, timeout_s: float):
        self.t, self.ann, self.group, self.pages, self.staging = t, ann, group, pages, staging
        self.write, self.timeout_s = write, timeout_s
        self.plan = message_plan(ann.num_layers, ann.num_pages, ann.part_bytes, ann.chunk_pages)
        self.window = max(2, window_bytes // max((m.nbytes for m in self.plan), default=1))
        self.posted: deque = deque()  # (message or None for the checksum, work, staging or None, buffer)
        self.next = self.landed = 0
        self.deadline = 0.0

    def run(self, deadline: float) -> tuple[str, str]:
        """Receive every message; (this side's checksum, the sender's). Raises ``TransferError``."""
        self.deadline = deadline
        if self.group.ordered:
            self.group.take_turn(self.ann.seq, deadline)
        checksum = Checksum(self.pages.device)
        try:
            self._fill()
            for self.landed in range(1, len(self.plan) + 1):
                message, work, base, buf = self.posted.popleft()
                try:
                    wait_work(work, self.deadline)
                finally:
                    if base is None:
                        self._landed_in_place()
                self.deadline = time.monotonic() + self.timeout_s  # renewed on progress: the sender computes
                self._fill()
                self._place(message, base, buf, checksum)
                self.t.status.advance(KVPoll.TRANSFERRING)
            _, work, _, digest = self.posted.popleft()
            wait_work(work, self.deadline)
        except BaseException:
            self._drain_in_place()
            raise
        if self.pages.device.type == "cuda":
            torch.cuda.current_stream().synchronize()  # pages visible to whatever stream decodes next
        return checksum.hexdigest(), decode_digest(digest)

    def _in_place(self, i: int) -> torch.Tensor | None:
        """The pages message ``i`` may land in directly, or None (see the module docstring)."""
        plan = self.plan
        if i == len(plan) or not self.write or len(plan[i].segments) != 1 or i == 0 \
                or plan[i - 1].last_layer < plan[i].last_layer:
            return None
        seg = plan[i].segments[0]
        return self.t.pages.window(seg.a, seg.b).run(self.pages.parts(seg.layer)[seg.part])

    def _fill(self) -> None:
        """Post receives up to the window, in order; stop at one that must wait for its layer's first."""
        t = self.t
        while self.next <= len(self.plan) and self.next < self.landed + self.window:
            target = self._in_place(self.next)
            if target is not None and (self.landed == 0 or
                                       self.plan[self.landed - 1].last_layer < self.plan[self.next].last_layer):
                return
            with t.lock:  # release() cannot slip in between the check and the post
                if target is not None and not t.released:
                    self._post(self.next, target)
                    t.in_place += 1
                else:
                    self._post(self.next, None)
            self.next += 1

    def _post(self, i: int, target: torch.Tensor | None) -> None:
        if i == len(self.plan):  # the sender's checksum
            message, base = None, torch.zeros(DIGEST_BYTES, dtype=torch.uint8, device=self.pages.device)
            buf = base
        else:
            message = self.plan[i]
            base = None if target is not None else self.staging.take(message.nbytes, self.pages.device)
            buf = target if target is not None else base[: message.nbytes]
        try:
            work = self.group.pg.recv([buf], SENDER_RANK, tag(self.ann.seq, i))
        except Exception as e:
            raise peer_error(e, self.deadline) from e
        self.posted.append((message, work, base, buf))
        if i == len(self.plan) and self.group.ordered:
            self.group.pass_turn(self.ann.seq)

    def _place(self, message: Message, base: torch.Tensor | None, buf: torch.Tensor, checksum: Checksum) -> None:
        """Hash a landed message and scatter it into the pages (unless it landed there)."""
        if base is None:
            checksum.update(buf)
            return
        offset = 0
        for seg in message.segments:
            view = buf[offset : offset + seg.nbytes].view(seg.b - seg.a, seg.page_bytes)
            if self.write:
                self.t.pages.window(seg.a, seg.b).scatter(self.pages.parts(seg.layer)[seg.part], view, checksum,
                                                          self.t.writing)
            else:
                checksum.update(view)
            offset += seg.nbytes
        self.staging.give(base)

    def _landed_in_place(self) -> None:
        with self.t.lock:
            self.t.in_place -= 1
            self.t.lock.notify_all()

    def _drain_in_place(self) -> None:
        """After a failure: wait out the receives still posted into the pages (they land, or fail at the
        deadline, which closes the pair), so that ``release`` can vouch for the pages."""
        for _, work, base, _ in self.posted:
            if base is None:
                try:
                    wait_work(work, self.deadline)
                except Exception:
                    pass
                self._landed_in_place()
