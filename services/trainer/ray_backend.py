"""The trainer's scale-out backend: the same recipe as a Ray Train `TorchTrainer` with N workers.

Chosen by `FLYWHEEL_TRAINER_BACKEND=ray`, or by `RAY_ADDRESS` in the environment with the
default `auto` (services/trainer/settings.py). Each worker runs `FullFinetuneRecipe` with a
`DistributedWorld` (services/trainer/world.py): the step's sequences are split over the workers
and their gradients added, so N workers follow one process's loss curve (to float rounding;
tests/services/trainer/test_ray_backend.py). torch.distributed runs over gloo on CPUs and NCCL
on GPUs, as Ray Train's `TorchConfig` sets it up.

What stays the same as one process, and how:
- checkpoints and resume: the main worker (rank 0) writes the run's checkpoints into the
  artifact store, which every worker reads at setup: the workers must share that directory (one
  machine, or a shared filesystem) until checkpoints move through the object store (issue 12);
- control: the service's `ControlGate` is mirrored into a small Ray actor that the main worker
  asks before every step (pause blocks there; stop and shutdown checkpoint and return);
- events: the main worker puts each event on a `ray.util.queue.Queue`; the service's thread
  drains it into `emit` (the bus), in order;
- failures: the main worker sends a `DatasetError` or `Diverged` back as itself, so the service
  rejects the dataset as it would in one process (and `DiskFull`, so it pauses); anything else
  fails the run for a retry. A run abandoned because the lease was lost checkpoints on the
  workers' way out (the gate mirrors `must_end`, not why).

The driver (the trainer service's worker thread) connects with `ray.init(address=...)`: the
cluster at `RAY_ADDRESS` (or `ray_address`), else a local one started on this machine.
"""

from __future__ import annotations

import queue as stdlib_queue
import threading
from pathlib import Path

from libs.common.artifacts import ArtifactStore
from libs.common.log import get_logger
from services.trainer.control import ControlGate
from services.trainer.recipe import Emit, FullFinetuneRecipe, TrainingJob, TrainingResult
from services.trainer.settings import TrainerSettings

log = get_logger("trainer.ray")
# How long the driver waits on the event queue before looking at the gate and the run again.
POLL_S = 0.2
# torch.distributed's collective timeout: a run paused longer than this would fail its workers.
COLLECTIVE_TIMEOUT_S = 7 * 24 * 3600


def _control_actor():
    import ray  # noqa: PLC0415

    @ray.remote(num_cpus=0)
    class Control:
        """The trainer's mode, as the main worker sees it (`RemoteGate`)."""

        def __init__(self) -> None:
            import asyncio  # noqa: PLC0415

            self.mode, self.must_end = "running", False
            self.changed = asyncio.Condition()

        async def set(self, mode: str, must_end: bool) -> None:
            async with self.changed:
                self.mode, self.must_end = mode, must_end
                self.changed.notify_all()

        async def proceed(self) -> bool:
            async with self.changed:
                await self.changed.wait_for(lambda: self.mode != "paused" or self.must_end)
                return self.mode == "running" and not self.must_end

    return Control


class RemoteGate(ControlGate):
    """The main worker's gate: asks the service's mode from the control actor before every step."""

    def __init__(self, control) -> None:
        super().__init__()
        self._control = control

    def proceed(self) -> bool:
        import ray  # noqa: PLC0415

        return ray.get(self._control.proceed.remote())


def _worker(config: dict) -> None:
    """One Ray Train worker: the recipe over this worker's share of every step."""
    from libs.common.log import setup_logging  # noqa: PLC0415
    from services.trainer.data import DatasetError  # noqa: PLC0415
    from services.trainer.disk import DiskFull  # noqa: PLC0415
    from services.trainer.divergence import Diverged  # noqa: PLC0415
    from services.trainer.world import DistributedWorld  # noqa: PLC0415

    settings: TrainerSettings = config["settings"]
    setup_logging("trainer", settings.log_level)
    world = DistributedWorld()
    events = config["events"]
    main = world.is_main

    def emit(subject: str, event) -> None:
        events.put(("event", subject, event))

    gate = RemoteGate(config["control"]) if main else ControlGate()
    store = ArtifactStore(Path(config["store_root"]))
    recipe = FullFinetuneRecipe(settings, config["job"], store, gate, emit if main else (lambda *_: None), world)
    try:
        recipe.setup()
        result = recipe.train()
    except (DatasetError, Diverged, DiskFull) as exc:
        if main:
            events.put(("refused", exc))
        raise
    finally:
        recipe.cleanup()
    if main:
        events.put(("result", result))


class RayBackend:
    """Runs one job on a Ray cluster, from the trainer service's worker thread."""

    def __init__(self, settings: TrainerSettings, address: str | None) -> None:
        self.settings = settings
        self.address = address

    def _connect(self) -> None:
        import ray  # noqa: PLC0415

        if ray.is_initialized():
            return
        if self.address:
            ray.init(address=self.address, log_to_driver=True)
        else:  # a local cluster, on this machine's cores
            ray.init(include_dashboard=False, log_to_driver=True)
        log.info("connected to ray", address=self.address or "local", resources=ray.cluster_resources())

    def run(self, job: TrainingJob, store: ArtifactStore, gate: ControlGate, emit: Emit) -> TrainingResult:
        import ray  # noqa: PLC0415
        from ray.train import FailureConfig, RunConfig, ScalingConfig  # noqa: PLC0415
        from ray.train.torch import TorchConfig, TorchTrainer  # noqa: PLC0415
        from ray.util.queue import Empty, Queue  # noqa: PLC0415

        self._connect()
        s = self.settings
        use_gpu = s.device == "cuda" or (s.device == "auto" and bool(ray.cluster_resources().get("GPU")))
        events = Queue()
        control = _control_actor().remote()
        trainer = TorchTrainer(
            _worker,
            train_loop_config={"settings": s, "job": job, "store_root": str(store.root), "events": events,
                               "control": control},
            scaling_config=ScalingConfig(num_workers=s.ray_workers, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=COLLECTIVE_TIMEOUT_S),
            # The run's own checkpoints are Flywheel's (the artifact store); Ray keeps only its
            # run records here. A failed worker fails the run: the trainer retries the dataset.
            run_config=RunConfig(name=job.run_id, storage_path=str(s.service_dir("trainer") / "ray"),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        fitted: stdlib_queue.Queue = stdlib_queue.Queue()

        def fit() -> None:
            try:
                trainer.fit()
                fitted.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the driver thread below
                fitted.put(exc)

        thread = threading.Thread(target=fit, name=f"ray-fit-{job.run_id}", daemon=True)
        thread.start()
        log.info("ray run started", run_id=job.run_id, workers=s.ray_workers, gpu=use_gpu)
        mirrored = None
        outcome: TrainingResult | None = None
        refused: Exception | None = None
        failure: BaseException | None = None
        finished = False
        while True:
            wanted = (gate.mode, gate.must_end)
            if wanted != mirrored:
                ray.get(control.set.remote(*wanted))
                mirrored = wanted
            try:
                message = events.get(timeout=POLL_S)
            except Empty:
                if finished:
                    break  # the run is over and every event it sent is out
                if not thread.is_alive():
                    failure, finished = fitted.get(), True
                continue
            kind = message[0]
            if kind == "event":
                emit(message[1], message[2])
            elif kind == "result":
                outcome = message[1]
            elif kind == "refused":
                refused = message[1]
        thread.join()
        ray.kill(control)
        if refused is not None:
            raise refused
        if failure is not None:
            raise RuntimeError(f"ray training run {job.run_id} failed: {failure}") from failure
        if outcome is None:
            raise RuntimeError(f"ray training run {job.run_id} ended without a result")
        return outcome
