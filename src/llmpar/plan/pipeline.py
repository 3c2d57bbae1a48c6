"""The interleaved 1F1B schedule as torch runs it, simulated: the idle share the plan charges for it.

torch's ``ScheduleInterleaved1F1B`` (v chunks per rank, chunk c on rank c mod p) computes each rank's
order of forwards and backwards, then lowers it (``_add_send_recv``): each send follows the compute that
produces it, and the matching receive is placed in the receiver's list as soon as the sender's compute
is placed, i.e. as early as possible. The runtime issues every send and receive as a batched NCCL
operation, and batched point-to-point operations of a process group run on its one NCCL stream per
rank, in the order posted. A receive posted early therefore holds every later send of its rank until its
data arrives. At 2 ranks the only peer is the next rank and this costs little; at 4, rank 0's receive of
micro-batch k for its second chunk (from rank 3) holds its send of micro-batch k+1 to rank 1 until k has
gone round all four ranks (profiled on 4 H100s: benchmarks/results/profile_h100x4/pp4-interleaved_actions.json).

:func:`interleaved_order` and :func:`lower` reproduce torch's two steps (tests/test_plan_pipeline.py
compares them with torch's own functions), and :func:`simulate` runs the lowered lists with one FIFO
stream of transfers per rank, a transfer starting when both its send and its receive are at the head of
their ranks' streams and its data is computed. Pure Python: the launcher's check imports no torch.
"""

from __future__ import annotations

import functools

# An action: (stage, kind, micro-batch) with kind F (forward), B (full backward), SF/SB (send the
# activation / its gradient), RF/RB (receive them).


def interleaved_order(p: int, m: int, v: int) -> dict[int, list]:
    """Each rank's forwards and backwards in the order of torch's ``ScheduleInterleaved1F1B``: a warm-up
    of forwards, then one forward and one backward at a time, then the remaining backwards (torch pads
    the lists with empty slots, which its runtime drops before lowering)."""
    rounds = max(1, m // p)
    per_round = m // rounds
    order = {}
    for rank in range(p):
        warmup = min((v - 1) * per_round + 2 * (p - 1 - rank), m * v)
        ops: list = []
        for op in range(m * v + warmup):
            if op < m * v:  # the forward of step ``op``
                ops.append(numbered(ops, (op // per_round) % v * p + rank, "F"))
            if op >= warmup:  # the backward of step ``op``, chunks in reverse
                ops.append(numbered(ops, (v - 1 - ((op - warmup) // per_round) % v) * p + rank, "B"))
        order[rank] = ops
    return order


def numbered(ops: list, stage: int, kind: str) -> tuple:
    """The next micro-batch of ``stage`` for ``kind``: micro-batches run in order on every chunk."""
    return stage, kind, sum(1 for s, k, _ in ops if (s, k) == (stage, kind))


def with_bookkeeping(ops: list, m: int, v: int) -> list:
    """A rank's order with the actions torch's runtime inserts before lowering, which take their turn in
    its placement: an UNSHARD of each chunk first, a REDUCE_GRAD after a chunk's last backward, a
    RESHARD of a chunk before the first action after its last (``_add_unshard_reshard`` with its 3
    active stages, which v <= 3 chunks never exceed, and ``_add_reduce_grad``)."""
    if v > 3:
        raise ValueError(f"{v} chunks per rank: torch's runtime would evict chunks (not modelled)")
    last = {s: i for i, (s, _, _) in enumerate(ops)}
    active = list(dict.fromkeys(s for s, _, _ in ops))
    out = [(s, "U", None) for s in active]
    for i, a in enumerate(ops):
        for s in sorted(c for c in active if last[c] < i):
            out.append((s, "R", None))
            active.remove(s)
        out.append(a)
        if a[1] == "B" and a[2] == m - 1:
            out.append((a[0], "G", None))
    return out + [(s, "R", None) for s in sorted(active)]


def lower(order: dict[int, list], p: int, n_stages: int) -> dict[int, list]:
    """torch's ``_add_send_recv``: the sends and receives between the ranks' computes, placed by going
    round the ranks one action at a time (a compute waits until its input's receive, or the compute
    producing it on this rank, is placed). Returns the computes, sends and receives only."""
    pending = {r: list(ops) for r, ops in order.items()}
    out: dict[int, list] = {r: [] for r in order}
    placed: dict[int, set] = {r: set() for r in order}

    def ready(a, seen) -> bool:
        s, kind, k = a
        if kind not in ("F", "B"):  # bookkeeping (with_bookkeeping): placed in its turn, no transfer
            return True
        if kind == "F" and s != 0:
            return (s, "RF", k) in seen or (s - 1, "F", k) in seen
        if kind == "B" and s != n_stages - 1:
            return (s, "RB", k) in seen or (s + 1, "B", k) in seen
        return True

    while pending:
        progress = False
        for rank in sorted(pending):
            a = pending[rank][0]
            if not ready(a, placed[rank]):
                continue
            s, kind, k = a
            if kind not in ("F", "B"):
                pending[rank].pop(0)
                if not pending[rank]:
                    del pending[rank]
                progress = True
                continue
            out[rank].append(a)
            placed[rank].add(a)
            peer_stage = s + 1 if kind == "F" else s - 1
            if 0 <= peer_stage < n_stages and peer_stage % p != s % p:
                send = (s, "SF" if kind == "F" else "SB", k)
                recv = (peer_stage, "RF" if kind == "F" else "RB", k)
                out[rank].append(send)
                placed[rank].add(send)
                out[peer_stage % p].append(recv)
                placed[peer_stage % p].add(recv)
            pending[rank].pop(0)
            if not pending[rank]:
                del pending[rank]
            progress = True
        if not progress:
            raise ValueError("malformed compute order: its sends and receives cannot be placed")
    return out


def simulate(lowered: dict[int, list], p: int, n_stages: int, fwd: float, bwd: float, xfer: float) -> float:
    """Seconds of one schedule: each rank computes its list in order (a chunk's forward ``fwd``, backward
    ``bwd``), a compute starting when its input has arrived; each rank's transfers run one at a time in
    list order on one stream, a transfer (``xfer``) starting when the send and the matching receive are
    both at the head of their streams and the sent data is computed."""
    done: dict[tuple, float] = {}
    at = dict.fromkeys(lowered, 0)
    free = dict.fromkeys(lowered, 0.0)  # compute stream
    link = dict.fromkeys(lowered, 0.0)  # transfer stream
    queue: dict[int, list] = {r: [] for r in lowered}
    while True:
        progress = False
        for r, ops in lowered.items():
            while at[r] < len(ops):
                s, kind, k = ops[at[r]]
                if kind in ("SF", "SB", "RF", "RB"):
                    queue[r].append(ops[at[r]])
                elif kind == "F":
                    need = (s, "RF", k) if s > 0 else None
                    if need and need not in done:
                        break
                    free[r] = done[(s, "F", k)] = max(free[r], done.get(need, 0.0)) + fwd
                else:
                    need = (s, "RB", k) if s < n_stages - 1 else None
                    if need and need not in done:
                        break
                    free[r] = done[(s, "B", k)] = max(free[r], done.get(need, 0.0), done[(s, "F", k)]) + bwd
                at[r] += 1
                progress = True
        for r in lowered:
            if not queue[r] or queue[r][0][1] not in ("SF", "SB"):
                continue
            s, kind, k = queue[r][0]
            dst = s + 1 if kind == "SF" else s - 1
            recv = (dst, "RF" if kind == "SF" else "RB", k)
            data = (s, "F" if kind == "SF" else "B", k)
            q = dst % p
            if data in done and queue[q] and queue[q][0] == recv:
                link[r] = link[q] = done[recv] = max(done[data], link[r], link[q]) + xfer
                queue[r].pop(0)
                queue[q].pop(0)
                progress = True
        if not progress:
            break
    if any(at[r] < len(ops) for r, ops in lowered.items()) or any(queue.values()):
        raise ValueError("the lowered schedule deadlocks on one transfer stream per rank")
    return max(free.values())


@functools.lru_cache(maxsize=256)
def interleaved_idle(p: int, m: int, v: int, xfer_per_fwd: float) -> float:
    """Idle share of each rank's step under the interleaved schedule as torch runs it, for chunks of
    equal time (a backward twice a forward) and a transfer taking ``xfer_per_fwd`` forwards."""
    n_stages = p * v
    order = {r: with_bookkeeping(ops, m, v) for r, ops in interleaved_order(p, m, v).items()}
    step = simulate(lower(order, p, n_stages), p, n_stages, 1.0, 2.0, xfer_per_fwd)
    return 1 - m * v * 3.0 / step
