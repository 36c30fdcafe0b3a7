"""Communication for patch parallelism, with every byte a process sends counted where it is sent.

`Comm` holds the counting; subclasses move the data: `DistComm` (torch.distributed: NCCL on GPUs, gloo on CPU),
`ThreadComm` (P simulated ranks as threads of one process, for tests) and `DryComm` (counts, moves nothing: the
communication figures run the real code on meta tensors). Counting model, per process:
- point-to-point: the bytes of every tensor it sends (exact);
- all-reduce: 2 (P-1)/P x size (a ring: reduce-scatter then all-gather, what NCCL's ring sends);
- all-gather: (P-1) x the (padded) chunk (a ring forwards every chunk but the one it receives last);
- broadcast: the size, on the source only.
`would_all_gather` books what sequence parallelism's all-gather of the same tensors would send, by the same formula.
"""

from __future__ import annotations

import abc
import queue
import threading
from collections import defaultdict
from collections.abc import Sequence

import torch

Pairs = Sequence[tuple[int, torch.Tensor]]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def ring_all_reduce_bytes(size_bytes: int, processes: int) -> int:
    return 0 if processes < 2 else 2 * (processes - 1) * size_bytes // processes


def ring_all_gather_bytes(chunk_bytes: int, processes: int) -> int:
    return (processes - 1) * chunk_bytes


class CommStats:
    """Bytes sent by this process, by kind (halo, pooled, text, gather, sync), and the bytes an alternative would
    send (`equivalent`, e.g. kv_all_gather)."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = defaultdict(int)
        self.equivalent: dict[str, int] = defaultdict(int)

    def add(self, kind: str, n: int) -> None:
        self.sent[kind] += int(n)

    def add_equivalent(self, kind: str, n: int) -> None:
        self.equivalent[kind] += int(n)

    def snapshot(self) -> dict[str, int]:
        return {**self.sent, **{f"{k} (equivalent)": v for k, v in self.equivalent.items()}}

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()
        self.equivalent.clear()


class Comm(abc.ABC):
    """One process's view of the group: `rank` of `size`; counts every byte it sends in `stats`."""

    def __init__(self, rank: int, size: int):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not in 0..{size - 1}")
        self.rank, self.size = int(rank), int(size)
        self.stats = CommStats()

    # -- counted operations (the only ones the parallel code calls) -----------------------------------------
    def exchange(self, sends: Pairs, recvs: Pairs, kind: str) -> None:
        """Point-to-point: send each (peer, tensor) in `sends`, fill each (peer, buffer) in `recvs`."""
        for _, t in sends:
            self.stats.add(kind, nbytes(t))
        if sends or recvs:
            self._exchange([(p, t.contiguous()) for p, t in sends], recvs)

    def all_reduce_(self, t: torch.Tensor, op: str, kind: str) -> torch.Tensor:
        """In-place all-reduce, op 'sum' or 'max'."""
        if op not in ("sum", "max"):
            raise ValueError(f"op must be 'sum' or 'max', got {op!r}")
        self.stats.add(kind, ring_all_reduce_bytes(nbytes(t), self.size))
        if self.size > 1:
            self._all_reduce(t, op)
        return t

    def all_gather(self, t: torch.Tensor, kind: str, sizes: Sequence[int] | None = None, dim: int = 0
                   ) -> list[torch.Tensor]:
        """Every process's `t`, in rank order. With `sizes` (each rank's length along `dim`), tensors may differ in
        that dimension: they are padded to the longest (and the padding is counted: it is sent)."""
        if sizes is None:
            self.stats.add(kind, ring_all_gather_bytes(nbytes(t), self.size))
            return [t] if self.size == 1 else self._all_gather(t.contiguous())
        if len(sizes) != self.size or t.shape[dim] != sizes[self.rank]:
            raise ValueError(f"sizes {list(sizes)} do not match rank {self.rank}'s length {t.shape[dim]}")
        longest = max(sizes)
        if t.shape[dim] < longest:
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        parts = self.all_gather(t, kind)
        return [p.narrow(dim, 0, n) for p, n in zip(parts, sizes)]

    def broadcast_(self, t: torch.Tensor, src: int, kind: str) -> torch.Tensor:
        if self.rank == src:
            self.stats.add(kind, nbytes(t) if self.size > 1 else 0)
        if self.size > 1:
            self._broadcast(t, src)
        return t

    def would_all_gather(self, chunk_bytes: int, kind: str) -> None:
        """Book what an all-gather of `chunk_bytes` per process would send (for comparison; nothing moves)."""
        self.stats.add_equivalent(kind, ring_all_gather_bytes(chunk_bytes, self.size))

    # -- uncounted bookkeeping (reports, progress): small, outside the attention layers ---------------------
    def max_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._all_reduce(t, "max")
        return t

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            self._all_reduce(t, "sum")
        return t

    # -- transport -------------------------------------------------------------------------------------------
    # Each transport (torch.distributed, threads in one process, a byte-counting dry run) implements these four.
    @abc.abstractmethod
    def _exchange(self, sends: Pairs, recvs: Pairs) -> None: ...

    @abc.abstractmethod
    def _all_reduce(self, t: torch.Tensor, op: str) -> None: ...

    @abc.abstractmethod
    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]: ...

    @abc.abstractmethod
    def _broadcast(self, t: torch.Tensor, src: int) -> None: ...


class DistComm(Comm):
    """torch.distributed (an initialised default process group): NCCL on GPUs, gloo on CPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        super().__init__(dist.get_rank(), dist.get_world_size())
        self.dist = dist
        self.device = torch.device(device)

    def _exchange(self, sends: Pairs, recvs: Pairs) -> None:
        d = self.dist
        ops = [d.P2POp(d.isend, t, peer) for peer, t in sends]
        ops += [d.P2POp(d.irecv, t, peer) for peer, t in recvs]
        for req in d.batch_isend_irecv(ops):
            req.wait()

    def _all_reduce(self, t: torch.Tensor, op: str) -> None:
        self.dist.all_reduce(t, op=self.dist.ReduceOp.SUM if op == "sum" else self.dist.ReduceOp.MAX)

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        out = [torch.empty_like(t) for _ in range(self.size)]
        self.dist.all_gather(out, t)
        return out

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        self.dist.broadcast(t, src)


class ThreadGroup:
    """P simulated ranks in one process: run one thread per rank, each with `group.comm(rank)` (tests)."""

    def __init__(self, size: int, timeout: float = 120.0):
        self.size = size
        self.timeout = timeout
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.mail = {(s, d): queue.Queue() for s in range(size) for d in range(size)}

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def run(self, fn, *args) -> list:
        """Call fn(comm, *args) on every rank in its own thread; return the results in rank order (re-raise)."""
        results: list = [None] * self.size
        errors: list[BaseException] = []

        def work(rank: int) -> None:
            try:
                results[rank] = fn(self.comm(rank), *args)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=work, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
            raise (real or errors)[0]
        return results


class ThreadComm(Comm):
    def __init__(self, group: ThreadGroup, rank: int):
        super().__init__(rank, group.size)
        self.group = group

    def _exchange(self, sends: Pairs, recvs: Pairs) -> None:
        for peer, t in sends:
            self.group.mail[(self.rank, peer)].put(t.clone())
        for peer, buf in recvs:
            buf.copy_(self.group.mail[(peer, self.rank)].get(timeout=self.group.timeout))

    def _collect(self, t: torch.Tensor) -> list[torch.Tensor]:
        g = self.group
        g.slots[self.rank] = t.clone()
        g.barrier.wait()
        parts = [s.clone() for s in g.slots]  # every rank reads the same slots, in rank order
        g.barrier.wait()
        return parts

    def _all_reduce(self, t: torch.Tensor, op: str) -> None:
        parts = self._collect(t)
        acc = parts[0]
        for p in parts[1:]:
            acc = acc + p if op == "sum" else torch.maximum(acc, p)
        t.copy_(acc)

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return self._collect(t)

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        t.copy_(self._collect(t)[src])


class DryComm(Comm):
    """Counts what `rank` would send and moves nothing (receive buffers keep their contents): run the parallel code
    on meta tensors to measure its traffic at any size."""

    def _exchange(self, sends: Pairs, recvs: Pairs) -> None:
        pass

    def _all_reduce(self, t: torch.Tensor, op: str) -> None:
        pass

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t] * self.size

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        pass
