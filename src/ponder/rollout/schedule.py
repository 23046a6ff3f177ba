"""The host side of the fast engine's continuous batching: which sequence runs in which row, and which KV
blocks hold its tokens.

All G x prompts samples of a call queue up, prompt by prompt (longest prompts first). At each host check
(every `sync_every` decode steps) finished rows give their blocks back, running rows get the blocks their
next `sync_every` positions need, and waiting samples take the free rows: a prompt is prefilled when its
first sample is admitted, its full blocks are shared by all its samples (each copies only the prompt's last,
partial block), and its first tokens are sampled then for all G samples at once. When the pool runs short,
the newest running sequence gives way (its blocks are freed; it waits again and is recomputed from its
tokens when readmitted). With nothing left waiting, the live rows move to the front of a smaller batch.
A sample's random draws depend on (seed, sequence, token index) alone, so which row it ran in, and when,
changes none of its tokens.
"""

from __future__ import annotations

from collections import deque

import torch

from ponder.errors import UserError
from ponder.kernels.sampler import row_keys
from ponder.rollout import decode_texts
from ponder.rollout.fast_model import queued, raw
from ponder.rollout.fast_sampling import sample
from ponder.rollout.kv_blocks import Blocks


class Schedule:
    def __init__(self, engine, f, prompts, params, limits: list[int]):
        self.e, self.f, self.prompts, self.params, self.limits = engine, f, prompts, params, limits
        self.n, self.block, self.every = params.n, f.block, engine.sync_every
        self.blocks = Blocks(f.blocks)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first, as prefill chunks go
        self.waiting = deque(p * self.n + j for p in order for j in range(self.n))
        self.entries: dict[int, list] = {}  # prompt -> [its blocks, samples not yet admitted]
        self.resume: dict[int, int] = {}  # a sequence that gave way -> the tokens it had
        self.checked: dict[int, int] = {}  # sequence -> tokens seen by the last stop-string check
        rows = f.rows
        self.seq = [-1] * rows  # row -> sequence, -1: free
        self.tables: list[list[int]] = [[] for _ in range(rows)]
        self.pos, self.n_out, self.age = [0] * rows, [0] * rows, [0] * rows
        self.admitted = self.peak = self.gave_way = 0
        self.batch = self.top = self.steps_left = 0
        self.since = 0  # decode steps queued since the last check
        self.sink = f.out_tok.shape[0] - 1
        f.table.zero_()
        f.row_seq.fill_(self.sink)
        for t in (f.live, f.pos, f.n_out, f.limit):
            t.zero_()

    # -- the check between decode steps -------------------------------------------------------------

    def stepped(self) -> None:
        """A decode step was queued: every row of the batch feeds one more position and has one more token."""
        self.steps_left -= 1
        self.top = min(self.top + 1, self.f.positions - 1)
        self.since += 1

    def look(self):
        """The reads a check needs, queued into host memory without waiting for them: the rows' live flags,
        positions and token counts, and (with stop strings) the tokens each running row made since the last
        check, with an overlap before them. sync() waits for them, so that decode steps queued after this call
        run meanwhile."""
        f, b = self.f, self.batch
        if not b:
            return None
        parts = [torch.stack([f.live[:b].long(), f.pos[:b], f.n_out[:b]]).reshape(-1)]
        tails = None
        if self.params.stop:
            # every row of the batch has made one token at each step queued since the last check
            rows = [r for r in range(b) if self.seq[r] >= 0]
            overlap = max(len(s) for s in self.params.stop) + 8
            lo = [max(0, self.checked.get(self.seq[r], 0) - overlap) for r in rows]
            hi = [self.n_out[r] + self.since for r in rows]
            width = max(h - low for h, low in zip(hi, lo)) if rows else 0
            if width > 0:
                cols = queued(lo, f.device)[:, None] + torch.arange(width, device=f.device)
                seqs = queued([self.seq[r] for r in rows], f.device)
                parts.append(f.out_tok[seqs[:, None], cols.clamp(max=f.out_tok.shape[1] - 1)].reshape(-1))
                tails = (rows, lo, hi, width)
        flat = torch.cat(parts)
        if flat.is_cuda:
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return host, done, tails
        return flat, None, tails

    def sync(self, seen=None, ahead: int = 0) -> None:
        """The check: `seen` is look()'s reads; `ahead` steps were queued after them (the rows are that much further)."""
        f, b = self.f, self.batch
        live = [False] * b
        tails = None
        if seen is not None:
            host, done, tails = seen
            if done is not None:
                done.synchronize()
            flat = host.tolist()
            self.pos[:b] = [p + ahead for p in flat[b: 2 * b]]
            self.n_out[:b] = [n + ahead for n in flat[2 * b: 3 * b]]
            # a row that made its last token in the steps queued after the reads is done too (no blocks for it)
            live = [bool(x) and (self.seq[r] < 0 or self.n_out[r] < self.limits[self.seq[r]])
                    for r, x in enumerate(flat[:b])]
            if tails is not None:
                rows, lo, hi, width = tails
                got = flat[3 * b:]
                tails = (rows, lo, hi, [got[i * width: (i + 1) * width] for i in range(len(rows))])
        self.since = 0
        if tails is not None:
            self._stop_strings(live, *tails)
        self._free([r for r in range(b) if self.seq[r] >= 0 and not live[r]])
        self._grow([r for r in range(b) if self.seq[r] >= 0])
        self._admit()
        self.peak = max(self.peak, f.blocks - 1 - len(self.blocks))
        if not self.waiting:
            self._compact()
        running = [r for r in range(self.batch) if self.seq[r] >= 0]
        if self.waiting and not running:
            raise UserError("fast engine: the KV cache cannot hold one more sequence; shorten max_tokens or raise "
                            + ("rollout.engine_options.kv_blocks" if self.e.kv_blocks is not None
                               else "rollout.engine_options.kv_fraction"))
        if not running:
            self.batch = 0
            return
        # free rows inside the batch keep stepping: point them back at slot 0 of the sink
        idle = queued([self.seq[r] < 0 for r in range(self.batch)], f.device)
        f.pos[: self.batch].masked_fill_(idle, 0)
        f.n_out[: self.batch].masked_fill_(idle, 0)
        self.top = min(max(self.top, *(self.pos[r] for r in running)), f.positions - 1)
        self.steps_left = max(self.limits[self.seq[r]] - self.n_out[r] for r in running)

    def _stop_strings(self, live, rows, lo, hi, tails):
        """Mark live rows whose new tokens complete a stop string; only the tail since the last check is decoded
        (read by look()), with an overlap so that a stop string split across checks is seen."""
        keep = [i for i, r in enumerate(rows) if live[r]]
        texts = decode_texts(self.e.tokenizer, [tails[i][: hi[i] - lo[i]] for i in keep])
        for i, t in zip(keep, texts):
            self.checked[self.seq[rows[i]]] = hi[i]
            if any(s in t for s in self.params.stop):
                live[rows[i]] = False

    def _free(self, rows):
        """Rows whose sequence finished (or gave way): blocks back to the pool, the row to the sink."""
        if not rows:
            return
        for r in rows:
            self.blocks.drop(self.tables[r])
            self.tables[r], self.seq[r] = [], -1
        f, idx = self.f, queued(rows, self.f.device)
        f.table[idx] = 0
        f.row_seq[idx] = self.sink
        for t in (f.live, f.limit):
            t[idx] = 0

    def _span(self, pos: int) -> int:
        """Blocks a row needs to feed positions up to pos + sync_every - 1 (the steps before the next check)."""
        return min((pos + self.every - 1) // self.block + 1, self.f.table.shape[1])

    def _grow(self, rows):
        """Blocks for the positions running rows reach before the next check; the newest give way if short."""
        need = {r: self._span(self.pos[r]) - len(self.tables[r]) for r in rows}
        short = sum(max(0, k) for k in need.values()) - len(self.blocks)
        if short > 0:
            self._more(short)
        while sum(max(0, k) for k in need.values()) > len(self.blocks):
            newest = max(need, key=lambda r: self.age[r])
            self.gave_way += 1
            self.resume[self.seq[newest]] = self.n_out[newest]
            self.waiting.appendleft(self.seq[newest])
            self._free([newest])
            del need[newest]
        writes = []
        for r, k in need.items():
            if k > 0:
                got = self.blocks.take(k)
                writes += [(r, len(self.tables[r]) + i, b) for i, b in enumerate(got)]
                self.tables[r] += got
        if writes:
            r, c, b = (queued(x, self.f.device) for x in zip(*writes))
            self.f.table[r, c] = b

    def _more(self, k: int) -> int:
        """Grow the pool by at least k blocks where the cap allows; returns the blocks added."""
        added = self.e.grow_pool(self.f, k)
        self.blocks.extend(added)
        return added

    # -- admission ----------------------------------------------------------------------------------

    def _admit(self):
        """Waiting sequences into free rows, while blocks last: prefill what they need, then fill the rows."""
        free_rows = [r for r in range(self.f.rows) if self.seq[r] < 0]
        running = sum(s >= 0 for s in self.seq)
        spare = len(self.blocks) - running  # a block a running row, for the window after the next one
        chosen, new_prompts = [], []
        while self.waiting and len(chosen) < len(free_rows):
            s = self.waiting[0]
            p = s // self.n
            length = len(self.prompts[p])
            if s in self.resume:  # all its own blocks: prompt and tokens so far, recomputed
                need = self._span(length + self.resume[s] - 1)
            else:
                need = self._span(length) - length // self.block
                if p not in self.entries and p not in new_prompts:
                    need += -(-length // self.block)
            if need > spare:
                spare += self._more(need - spare + running)
            if need > spare:
                break
            spare -= need
            self.waiting.popleft()
            chosen.append(s)
            if s not in self.resume and p not in self.entries and p not in new_prompts:
                new_prompts.append(p)
        if not chosen:
            return
        self._prefill_prompts(new_prompts)
        resumed = [s for s in chosen if s in self.resume]
        own = self._recompute(resumed) if resumed else {}
        self._place(sorted(chosen), free_rows, own)

    def _prefill_prompts(self, prompts):
        """Prefill in chunks of about prefill_tokens (padded width x prompts), longest first; sample the first
        token of every sample of each prompt."""
        f, n, dev = self.f, self.n, self.f.device
        start = 0
        while start < len(prompts):
            end, width = start + 1, len(self.prompts[prompts[start]])
            while end < len(prompts) and width * (end + 1 - start) <= self.e.prefill_tokens:
                end += 1
            chunk = prompts[start:end]
            for p in chunk:
                self.entries[p] = [self.blocks.take(-(-len(self.prompts[p]) // self.block)), n]
            logits = f.prefill([self.prompts[p] for p in chunk], self._table([self.entries[p][0] for p in chunk]))
            seqs = (queued(chunk, dev)[:, None] * n + torch.arange(n, device=dev)).reshape(-1)
            keys = row_keys(f.seed, torch.zeros((), dtype=torch.long, device=dev), seqs)
            pr = self.params
            tok, lp, ent = sample(logits.repeat_interleave(n, 0), pr.temperature, pr.top_k, pr.top_p, keys, True, f.k,
                                  pr.min_p)
            f.out_tok[seqs, 0] = tok
            f.out_lp[seqs, 0] = lp.float()
            f.out_ent[seqs, 0] = ent
            start = end

    def _recompute(self, seqs) -> dict:
        """Sequences that gave way: their prompt and tokens but the last, prefilled again into new blocks;
        {sequence: its blocks}."""
        f = self.f
        toks = f.out_tok[torch.tensor(seqs, device=f.device)].tolist()
        lists = [self.prompts[s // self.n] + toks[i][: self.resume[s] - 1] for i, s in enumerate(seqs)]
        decoded = [len(self.prompts[s // self.n]) for s in seqs]
        own = [self.blocks.take(self._span(len(t))) for t in lists]
        per_chunk = max(1, self.e.prefill_tokens // max(map(len, lists)))
        for start in range(0, len(lists), per_chunk):
            part = slice(start, start + per_chunk)
            f.prefill(lists[part], self._table(own[part]), decoded[part])
        return dict(zip(seqs, own))

    def _place(self, seqs, free_rows, recomputed: dict):
        """`seqs` into `free_rows`: recomputed ones with their own blocks, others sharing their prompt's."""
        f, dev = self.f, self.f.device
        rows = free_rows[: len(seqs)]
        copies, n_out, pos = [], [], []
        for r, s in zip(rows, seqs):
            p = s // self.n
            length = len(self.prompts[p])
            self.age[r], self.admitted = self.admitted, self.admitted + 1
            self.seq[r] = s
            if s in self.resume:
                k = self.resume.pop(s)
                self.tables[r] = recomputed[s]
                n_out.append(k)
                pos.append(length + k - 1)
                continue
            blocks, left = self.entries[p]
            full = length // self.block
            shared = blocks[:full]
            self.blocks.hold(shared)
            own = self.blocks.take(self._span(length) - full)
            if length % self.block:  # the prompt's last block, partly filled: each sample writes its own copy
                copies.append((blocks[full], own[0]))
            self.tables[r] = shared + own
            self.entries[p][1] = left - 1
            if left == 1:  # its last sample: the prompt's own hold ends
                self.blocks.drop(blocks)
                del self.entries[p]
            n_out.append(1)
            pos.append(length)
        if copies:
            src, dst = (queued(x, dev) for x in zip(*copies))
            raw(f.kv)[:, :, dst] = raw(f.kv)[:, :, src]
        idx, sq = queued(rows, dev), queued(seqs, dev)
        k = queued(n_out, dev)
        f.table[idx] = self._table([self.tables[r] for r in rows], f.table.shape[1])
        f.load_rows(idx)
        f.row_seq[idx] = sq
        f.n_out[idx] = k
        f.pos[idx] = queued(pos, dev)
        f.limit[idx] = queued([self.limits[s] for s in seqs], dev)
        tok = f.out_tok[sq, k - 1]
        f.tokens[idx] = tok
        f.live[idx] = ~(tok[:, None] == f.eos[None, :]).any(-1) & (k < f.limit[idx])
        for r, a, b in zip(rows, n_out, pos):
            self.n_out[r], self.pos[r] = a, b
        self.batch = max(self.batch, rows[-1] + 1)

    def _table(self, tables, width: int | None = None) -> torch.Tensor:
        width = width or max(map(len, tables))
        return queued([t + [0] * (width - len(t)) for t in tables], self.f.device)

    def _compact(self):
        """Live rows to the front of the smallest batch bucket that holds them (only their tables move)."""
        b = self.batch
        used = [r for r in range(b) if self.seq[r] >= 0]
        target = self.e._bucket(len(used), b) if used else 0
        if not used or target >= b:
            return
        keep = used + [r for r in range(b) if self.seq[r] < 0][: target - len(used)]
        self.f.compact(queued(keep, self.f.device))
        for arr in (self.seq, self.tables, self.pos, self.n_out, self.age):
            arr[: len(keep)] = [arr[r] for r in keep]
        for r in range(len(keep), b):
            self.seq[r], self.tables[r] = -1, []
        self.batch = target
