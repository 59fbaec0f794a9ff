"""torch.distributed communicator: NCCL on GPU, gloo on CPU, never a silent hang.

- The process group is created with a timeout, so a collective that a peer never joins fails.
- Every failure becomes a DistributedError that names this rank, the collective, and the peer to
  blame when known: ranks about to fail publish their error in the rendezvous store
  (``report_failure``), and ranks on the same host publish their pid so a peer that died without a
  word is named too.
"""
from __future__ import annotations

import datetime
import os
import socket
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from spava_plan.errors import DistributedError

from . import Communicator, DoneHandle, Handle

_ERROR_KEY = "spava/error/{}"
_PID_KEY = "spava/pid/{}"
_BLAME_TIMEOUT = datetime.timedelta(seconds=2)  # store look-ups while diagnosing a failure
# torch >= 2.12 renames all_gather_into_tensor (the old name warns); same semantics.
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def free_port() -> int:
    """An unused TCP port on this host (for MASTER_PORT in local launches and tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_line(exc: BaseException) -> str:
    """The backend's message without its boilerplate advice (gloo appends several sentences)."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line.split(". This is typically")[0]


class _DistHandle:
    def __init__(self, comm: "TorchDistComm", works: list, what: str):
        self._comm, self._works, self._what = comm, works, what

    def wait(self) -> None:
        works, self._works = self._works, []
        self._comm._guard(self._what, lambda: [w.wait() for w in works])


class TorchDistComm(Communicator):
    """A rank of a torch.distributed world (the default process group unless ``group`` is given)."""

    def __init__(self, group: Any = None, *, store: Any = None, timeout_s: float | None = None):
        if not dist.is_initialized():
            raise DistributedError("torch.distributed is not initialised; use TorchDistComm.init(...) or "
                                   "TorchDistComm.from_env() (under torchrun)", setting="runtime")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.label = f"{self.backend} {self.world_size}-rank"
        self.timeout_s = timeout_s
        self._store = store
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl"
                       else torch.device("cpu"))
        if store is not None:
            try:
                store.set(_PID_KEY.format(self.rank), f"{socket.gethostname()}:{os.getpid()}")
            except Exception:  # noqa: BLE001 - diagnostics only
                pass

    # -- set-up ------------------------------------------------------------------------------------
    @classmethod
    def init(cls, rank: int, world_size: int, *, master_addr: str = "127.0.0.1", master_port: int,
             backend: str | None = None, timeout_s: float = 300.0, device: int | None = None,
             host_store: bool | None = None, store_prefix: str = "") -> "TorchDistComm":
        """Create the default process group over a TCP store. Rank 0 hosts the store unless
        ``host_store=False`` everywhere (a launcher hosts it, so it outlives any rank and the
        peers of a failed rank 0 can still read why it failed)."""
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            # A timed-out NCCL collective must abort the process instead of blocking forever.
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            torch.cuda.set_device(device if device is not None else rank % torch.cuda.device_count())
        timeout = datetime.timedelta(seconds=timeout_s)
        try:
            is_host = rank == 0 if host_store is None else host_store
            store = dist.TCPStore(master_addr, master_port, world_size if is_host else None, is_host,
                                  timeout=timeout, wait_for_workers=False)
            if store_prefix:
                store = dist.PrefixStore(store_prefix, store)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - rendezvous failures become one clear line
            raise DistributedError(f"rank {rank}: could not join the {world_size}-rank {backend} group at "
                                   f"{master_addr}:{master_port} within {timeout_s:g} s: {_first_line(exc)}",
                                   setting="runtime") from None
        return cls(store=store, timeout_s=timeout_s)

    @classmethod
    def from_env(cls, *, backend: str | None = None, timeout_s: float = 300.0) -> "TorchDistComm":
        """Under torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (LOCAL_RANK picks the GPU)."""
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
        except (KeyError, ValueError) as exc:
            raise DistributedError(f"missing or bad torchrun environment variable {exc}; launch with torchrun",
                                   setting="runtime") from None
        local = int(os.environ.get("LOCAL_RANK", rank))
        # torchrun's agent already serves the store at MASTER_PORT: join it as a client, under the
        # key prefix torch's own env:// initialisation uses for this restart attempt.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        prefix = f"/worker/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}" if agent else ""
        return cls.init(rank, world, master_addr=addr, master_port=port, backend=backend, timeout_s=timeout_s,
                        device=local if torch.cuda.is_available() else None, host_store=False if agent else None,
                        store_prefix=prefix)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- failure handling --------------------------------------------------------------------------
    def report_failure(self, exc: BaseException) -> None:
        if self._store is None or isinstance(exc, DistributedError):
            return
        try:
            self._store.set(_ERROR_KEY.format(self.rank), f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; nothing more to say
            pass

    def _blame(self) -> str:
        """What the peers reported, or which same-host peers have exited."""
        if self._store is None:
            return ""
        found = []
        try:
            self._store.set_timeout(_BLAME_TIMEOUT)
            for r in range(self.world_size):
                if r == self.rank:
                    continue
                if self._store.check([_ERROR_KEY.format(r)]):
                    found.append(f"rank {r} failed: {self._store.get(_ERROR_KEY.format(r)).decode()}")
            if not found:
                host = socket.gethostname()
                for r in range(self.world_size):
                    if r != self.rank and self._store.check([_PID_KEY.format(r)]):
                        where, pid = self._store.get(_PID_KEY.format(r)).decode().rsplit(":", 1)
                        if where == host and not _alive(int(pid)):
                            found.append(f"rank {r} (pid {pid}) has exited")
        except Exception:  # noqa: BLE001 - the store lives on rank 0, which may itself be gone
            if not found:
                found.append("the rendezvous store on rank 0 is unreachable (rank 0 may have exited)")
        return "; ".join(found)

    def _guard(self, what: str, op: Callable[[], Any]) -> Any:
        try:
            return op()
        except DistributedError:
            raise
        except Exception as exc:  # noqa: BLE001 - gloo/NCCL raise RuntimeError subclasses
            # gloo says "Timed out waiting ..." or "Application timeout caused pair closure"
            timed_out = any(w in f"{type(exc).__name__} {exc}".lower() for w in ("timed out", "timeout"))
            verb = f"timed out after {self.timeout_s:g} s" if timed_out and self.timeout_s else "failed"
            cause = self._blame() or "a peer rank crashed, hung or left"
            raise DistributedError(f"rank {self.rank}: {what} {verb}: {cause} [{self.backend}: {_first_line(exc)}]",
                                   setting="runtime") from None

    # -- operations --------------------------------------------------------------------------------
    def all_gather_into_tensor(self, out: torch.Tensor, inp: torch.Tensor, async_op: bool = False,
                               tag: str = "") -> Handle | None:
        what = f"all_gather {tag!r}"
        work = self._guard(what, lambda: _ALL_GATHER(out, inp, group=self.group, async_op=async_op))
        if async_op:
            return _DistHandle(self, [work], what)
        return None

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int],
                          in_splits: Sequence[int], tag: str = "") -> None:
        self._guard(f"all_to_all {tag!r}", lambda: dist.all_to_all_single(
            out, inp, output_split_sizes=list(out_splits), input_split_sizes=list(in_splits), group=self.group))

    def all_reduce(self, t: torch.Tensor, tag: str = "reduce") -> None:
        self._guard(f"all_reduce {tag!r}", lambda: dist.all_reduce(t, group=self.group))

    def broadcast(self, t: torch.Tensor, src: int, tag: str = "", async_op: bool = False) -> Handle | None:
        what = f"broadcast {tag!r} from rank {src}"
        work = self._guard(what, lambda: dist.broadcast(t, src, group=self.group, async_op=async_op))
        if async_op:
            return _DistHandle(self, [work], what)
        return None

    def exchange(self, send: torch.Tensor, dst: int, recv: torch.Tensor, src: int, tag: str = "") -> Handle:
        if self.world_size == 1:
            recv.copy_(send)
            return DoneHandle()
        what = f"exchange {tag!r} (send to rank {dst}, receive from rank {src})"
        # Batched so NCCL groups the pair (separate isend/irecv can deadlock on a ring).
        ops = [dist.P2POp(dist.isend, send, dst, group=self.group), dist.P2POp(dist.irecv, recv, src, group=self.group)]
        works = self._guard(what, lambda: dist.batch_isend_irecv(ops))
        return _DistHandle(self, list(works), what)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._guard("all_gather_object", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def barrier(self) -> None:
        self._guard("barrier", lambda: dist.barrier(group=self.group))

    def _send(self, t: torch.Tensor, dst: int, tag: str) -> None:
        self._guard(f"send {tag!r} to rank {dst}", lambda: dist.send(t, dst, group=self.group))

    def _recv(self, t: torch.Tensor, src: int, tag: str) -> None:
        self._guard(f"recv {tag!r} from rank {src}", lambda: dist.recv(t, src, group=self.group))


def _alive(pid: int) -> bool:
    """False once the process has exited (a not-yet-reaped zombie counts as exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
