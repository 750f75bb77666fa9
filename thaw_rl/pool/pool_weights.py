"""How a ForkPool's workers get weights: ``update_weights`` and the weights a replacement worker starts with.

Why apart from ``fork_pool.py``: moving weights is its own job with two transports. ``"shared_memory"``
packs a state dict into one /dev/shm buffer that every worker maps (and that is kept for replacements);
``"distributed"`` broadcasts packed buckets over a gloo/NCCL group of the parent and the workers
(``weight_sync.py``), keeps nothing, and a replacement gets the current version from a worker that holds
it (a worker-only group), else from ``weights_source``. When every worker is on the device of the trainer's
tensors, ``"distributed"`` moves them by CUDA IPC instead (``weight_ipc``: automatic on CUDA; forced on
the CPU, where the same handles are shared memory): the trainer packs the buckets into device buffers it
keeps and reuses, each worker opens its own handle of them and copies. A pool with any worker elsewhere
uses NCCL/gloo for every worker (no mixed update); a replacement fed by a peer worker uses gloo. Either
way each worker's version goes up and its prefix cache is dropped; a worker refuses requests that
expect another version.

``PoolWeights`` is a mixin of ``ForkPool``: it uses the pool's workers, calls and retry helper.
"""

from __future__ import annotations

import time
from typing import Mapping

import torch

from thaw_rl.pool.weight_sync import (GroupSpec, TransferGroup, WeightLayout, new_store, pack_buckets, plan_buckets,
                                      send_weights, share_buckets)
from thaw_rl.pool.worker import PackedWeights
from thaw_rl.pool.worker_process import WorkerFailure

Attempt = tuple[dict, dict, list]  # (workers' exceptions, WorkerFailures, handles made so far)


class PoolWeights:
    """``update_weights`` and replacement weights for ``ForkPool`` (see the module docstring)."""

    def update_weights(self, state_dict: Mapping[str, torch.Tensor] | None = None, version: int | None = None) -> None:
        """Give every worker ``state_dict`` and drop their prefix caches and snapshots; the version becomes ``version``.

        ``version`` defaults to the current one + 1; a caller that counts versions itself (a trainer: its
        optimizer steps) passes its own, which must not go back. When this returns, every worker holds
        the new version (a worker that failed to load was replaced by one that got the new weights), and
        every later request carries that version: a worker with other weights refuses it.
        """
        self._check_open()
        if state_dict is None:
            raise ValueError(
                "ForkPool workers hold their own copies of the model: pass the new weights, e.g. "
                "pool.update_weights(model.state_dict()).")
        version = self._version + 1 if version is None else int(version)
        if version < self._version:
            raise ValueError(f"update_weights(version={version}): the workers hold version {self._version} "
                             f"already; versions never go back.")
        start = time.perf_counter()
        self._check_weights(state_dict)
        self._drop_all_snapshots()  # they hold KV computed with the old weights
        if self.weight_sync == "shared_memory":
            self._weights = PackedWeights.pack(state_dict, version)
            self._version = version
            calls = {w: ("load_weights", (self._weights,)) for w in range(self.num_workers)}
            _, errors, failures = self._call_all(calls)
            for w, exc in errors.items():  # a load that raised may have left the worker half updated
                failures[w] = WorkerFailure(self._workers[w], "load_weights", f"raised {type(exc).__name__}: {exc}")
            self._settle({}, failures, {}, 0, "update_weights", [])  # replacements start with the new weights
            self.weight_sync_bytes += self._weights.nbytes * self.num_workers
        else:
            self._push(self._parameters_of(state_dict), version)
        self.last_weight_sync_seconds = time.perf_counter() - start
        self.weight_sync_seconds += self.last_weight_sync_seconds

    def _check_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        unknown = [k for k in state_dict if k not in self._weight_shapes]
        if unknown:
            raise ValueError(f"update_weights: {len(unknown)} names are not in the workers' model, e.g. {unknown[:3]}; "
                             f"pass model.state_dict() of the same architecture.")
        for name, t in state_dict.items():
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"update_weights: {name} is a {type(t).__name__}, not a tensor.")
            shape = self._weight_shapes[name][0]
            if tuple(t.shape) != shape:
                raise ValueError(f"update_weights: {name} has shape {tuple(t.shape)}, the workers' model has {shape}.")

    def _parameters_of(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every parameter of the workers' model, from ``state_dict`` (buffers and tied copies are not sent)."""
        missing = [k for k in self._parameter_shapes if k not in state_dict]
        if missing:
            raise ValueError(f"update_weights with weight_sync='distributed' sends every parameter, but {len(missing)} "
                             f"are missing, e.g. {missing[:3]}; pass dict(model.named_parameters()) or "
                             f"model.state_dict().")
        return {k: state_dict[k] for k in self._parameter_shapes}

    def _push(self, tensors: dict[str, torch.Tensor], version: int) -> None:
        """Broadcast ``tensors`` from this process to every worker, in buckets; retried once after a failure."""
        layout = plan_buckets({k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}, self.weight_bucket_bytes)

        def attempt() -> Attempt:
            return (*self._transfer(None, list(range(self.num_workers)), layout, version, tensors), [])

        self._pushing = True
        try:
            self._retrying("update_weights", attempt)
        finally:
            self._pushing = False
        self._version = version
        self._weights_given = True
        self.weight_sync_bytes += layout.nbytes * self.num_workers

    def _transfer(self, root: int | None, targets: list[int], layout: WeightLayout, version: int,
                  tensors: Mapping[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
        """Weights version ``version`` from ``root`` (None: this process, sending ``tensors``) to ``targets``.

        Returns (errors, failures) as ``_call_all`` does; a worker that raised is a failure (it may hold half
        a transfer's group state), and any failure drops the parent's group so the next push forms a new one.
        """
        if root is None and self._uses_ipc(next(iter(tensors.values())).device):
            return self._transfer_ipc(targets, layout, version, tensors)
        members = ([] if root is None else [root]) + list(targets)
        stopped = {w: cause for w in members if (cause := self._workers[w].stopped_cause()) is not None}
        if stopped:  # it would never join the group, and everyone else would wait timeout_s for it there
            self._group = None
            return {}, {w: WorkerFailure(self._workers[w], "transfer_weights", cause) for w, cause in stopped.items()}
        offset = 1 if root is None else 0  # the parent is rank 0 of a group it sends from
        devices = [self._devices[w] for w in members]
        if root is None:
            devices.append(str(next(iter(tensors.values())).device))
        # NCCL needs one GPU per rank; members sharing a GPU go through gloo (or CUDA IPC above)
        on_cuda = all(d.startswith("cuda") for d in devices) and len(set(devices)) == len(devices)
        backend = "nccl" if on_cuda else "gloo"
        self.last_weight_transport = backend
        everyone = root is None and len(targets) == self.num_workers  # the group kept for the next pushes
        group = self._group if everyone else None
        if group is not None:
            spec, store = group.spec, group.store
        else:
            store = new_store(self.timeout_s)
            spec = GroupSpec(next(self._group_ids), "127.0.0.1", store.port, 0, len(members) + offset, backend,
                             self.timeout_s)
            if not everyone:
                self._stores = self._stores[-3:] + [store]  # workers keep clients of it: keep it alive a while
        calls = {w: ("transfer_weights", (spec.for_rank(i + offset), layout, 0, version))  # the root is rank 0
                 for i, w in enumerate(members)}
        pending = self._send_all(calls)
        error = None
        if root is None:
            try:
                if group is None:
                    group = TransferGroup(spec, next(iter(tensors.values())).device, store)
                    self._parent_groups.append(group)
                    if everyone:
                        self._group = group
                    else:
                        self._stores.append(group)  # not destroyed here: gloo's teardown can wait on peers
                send_weights(group, layout, tensors)
            except Exception as exc:  # noqa: BLE001 (a member died or hung: the replies below say which)
                error = exc
        values, errors, failures = self._collect(pending)
        for w, exc in errors.items():
            failures[w] = WorkerFailure(self._workers[w], "transfer_weights", f"raised {type(exc).__name__}: {exc}")
        if error is not None or failures:
            self._group = None
        if error is not None and not failures:
            raise RuntimeError(f"ForkPool weight broadcast failed ({type(error).__name__}: {error}) although every "
                               f"worker answered; the pool's group is dropped and the next update forms a new one.")
        return {}, failures

    def _uses_ipc(self, device: torch.device) -> bool:
        """Whether the trainer's tensors on ``device`` go to the workers by CUDA IPC (see ``weight_ipc``)."""
        if self.weight_ipc is False:
            return False
        same = all(_same_device(d, device) for d in self._devices)
        if self.weight_ipc is None:
            return same and device.type == "cuda"
        if not same:
            raise ValueError(f"weight_ipc=True shares the trainer's buffers, so every worker must be on the device of "
                             f"the weights ({device}), but the workers are on {sorted(set(self._devices))}; pass "
                             f"weight_ipc=None (IPC only where it applies) or move the weights.")
        return True

    def _transfer_ipc(self, targets: list[int], layout: WeightLayout, version: int,
                      tensors: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
        """Pack into the kept buffers, hand each target its own handle, wait until all copied; (errors, failures).

        The buffers are reused by the next update of the same layout: every handle handed out was opened and
        let go before its reply, or its worker is dead (killed here on a timeout), so no one reads them then.
        """
        device = next(iter(tensors.values())).device
        kept = self._ipc_buffers if self._ipc_buffers is not None and self._ipc_buffers[0] == layout else None
        buffers = pack_buckets(layout, tensors, device, None if kept is None else kept[1])
        self._ipc_buffers = (layout, buffers)
        self.last_weight_transport = "ipc"
        payloads = share_buckets(buffers, len(targets))
        calls = {w: ("open_weights", (payload, layout, version)) for w, payload in zip(targets, payloads)}
        _, errors, failures = self._call_all(calls)
        for w, exc in errors.items():
            failures[w] = WorkerFailure(self._workers[w], "open_weights", f"raised {type(exc).__name__}: {exc}")
        return {}, failures

    def _give_current_weights(self, indices: list[int]) -> None:
        """Distributed: fresh workers get the current version from a worker holding it, else from weights_source."""
        donors = [w for w in range(self.num_workers) if w not in indices and not self._workers[w].closed
                  and self._workers[w].status.get("version") == self._version]
        layout = plan_buckets(self._parameter_shapes, self.weight_bucket_bytes)
        if donors:
            _, failures = self._transfer(donors[0], indices, layout, self._version)
        else:
            version, tensors = self.weights_source() if self.weights_source is not None else (None, None)
            if version != self._version:
                raise RuntimeError(
                    f"no worker holds weights version {self._version} any more and weights_source "
                    f"{'gave version ' + str(version) if self.weights_source else 'is not set'}: call "
                    f"update_weights with the current weights (or pass ForkPool(weights_source=...)).")
            _, failures = self._transfer(None, indices, plan_buckets(
                {k: (tuple(t.shape), t.dtype) for k, t in self._parameters_of(tensors).items()},
                self.weight_bucket_bytes), self._version, self._parameters_of(tensors))
        if failures:
            raise RuntimeError(f"ForkPool's new worker(s) could not get weights version {self._version}: "
                               f"{'; '.join(map(str, failures.values()))}")

    def _load_current_weights(self, indices: list[int]) -> None:
        if self.weight_sync == "distributed":
            if self._weights_given and not self._pushing:
                self._give_current_weights(indices)
            return
        if self._weights is None:
            return
        for i in indices:
            self._workers[i].bytes_sent += self._weights.nbytes
        _, errors, failures = self._call_all({i: ("load_weights", (self._weights,)) for i in indices})
        if errors or failures:
            raise RuntimeError(f"ForkPool's new worker(s) could not load weights version {self._version}: "
                               f"{list(errors.values()) + list(failures.values())}")


def _same_device(worker_device: str, device: torch.device) -> bool:
    """A worker on "cuda" (no index) runs on GPU 0: its spawned process starts there."""
    d = torch.device(worker_device)
    index = d.index if d.index is not None else (0 if d.type == "cuda" else None)
    other = device.index if device.index is not None else (0 if device.type == "cuda" else None)
    return d.type == device.type and index == other
