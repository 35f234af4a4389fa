"""pycomm.lightning.PycommCallback on 2 Gloo ranks through a real PyTorch Lightning Trainer (CPU).

Each rank is a process of run_distributed with Gloo already up; Lightning joins it as a DDP run
whose processes were launched externally (LightningEnvironment with LOCAL_RANK set), so no
launcher of Lightning's own runs inside pytest. All runs share one spawn (importing Lightning
costs seconds); the tests below check its pieces.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

from dist_utils import run_distributed  # noqa: E402

WORLD = 2
SAMPLES, BATCH = 64, 8            # 64 / (2 ranks * 8) = 4 steps per epoch
EPOCHS, SAVED_EPOCH = 4, 1        # the continuous run saves after every epoch; resume after epoch index 1
STEPS_PER_EPOCH = SAMPLES // (WORLD * BATCH)
METHODS = {
    # deterministic: no sampling, no masking; the hook holds the momentum, so the optimizer has none
    "dgc": dict(density=1.0, momentum=0.9, momentum_masking=False, min_numel=64),
    "quant": dict(bits=8, min_numel=64),
}
# run name: (method or None for plain DDP, DDPStrategy options). A fresh DDP lays out its bucket in model
# order and rebuilds it in gradient order after its first step; find_unused_parameters=True keeps the
# first layout for good ("fixed buckets"), so a resumed first step sees the layout the state was saved in.
RUNS = {
    "plain": (None, {}),
    "plain, fixed buckets": (None, {"find_unused_parameters": True}),
    "dgc": ("dgc", {}),
    "quant": ("quant", {}),
    "quant, fixed buckets": ("quant", {"find_unused_parameters": True}),
}


class TinyNet(pl.LightningModule):
    """A conv + MLP of about 17k parameters on 1x8x8 inputs, 4 classes."""

    def __init__(self, momentum: float) -> None:
        super().__init__()
        self.momentum = momentum
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
            torch.nn.Linear(512, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=self.momentum)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1234)
        x = torch.randn(SAMPLES, 1, 8, 8, generator=g)
        y = torch.randint(0, 4, (SAMPLES,), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH, shuffle=False)


def _state_norm(sd) -> float:
    """The 2-norm over every floating tensor of a hook state dict, whatever its layout."""
    if isinstance(sd, torch.Tensor):
        return float(sd.double().pow(2).sum()) if sd.is_floating_point() else 0.0
    if isinstance(sd, dict):
        return sum(_state_norm(v) for v in sd.values())
    if isinstance(sd, (list, tuple)):
        return sum(_state_norm(v) for v in sd)
    return 0.0


class _Recorder(pl.Callback):
    """After every step: the hook state's norm and the bytes the step's collectives sent. At train start
    it calls the pycomm callback's on_fit_start a second time, which must leave the registration alone."""

    def __init__(self, compress) -> None:
        self.compress = compress
        self.norms: dict[int, float] = {}
        self.bytes: dict[int, int] = {}
        self.reentry_kept_state: list[bool] = []
        self._counter = None

    def on_train_start(self, trainer, pl_module):
        if self.compress is not None:
            state = self.compress.state
            self.compress.on_fit_start(trainer, pl_module)   # DDP would raise if it registered again
            self.reentry_kept_state.append(self.compress.state is state)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from pycomm.traffic import CollectiveByteCounter
        self._counter = CollectiveByteCounter().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._counter.__exit__(None, None, None)
        self.bytes[trainer.global_step] = self._counter.bytes_sent
        if self.compress is not None:
            self.norms[trainer.global_step] = _state_norm(self.compress.state.state_dict()) ** 0.5


def _spy_on_loads(pycomm) -> list[float]:
    """Make every state that pycomm.register returns record the norm of each state dict it loads."""
    loaded: list[float] = []
    register = pycomm.register

    def register_and_spy(*args, **kwargs):
        state = register(*args, **kwargs)
        load = state.load_state_dict

        def load_and_record(sd, *a, **k):
            loaded.append(_state_norm(sd) ** 0.5)
            return load(sd, *a, **k)

        state.load_state_dict = load_and_record
        return state

    pycomm.register = register_and_spy
    return loaded


def _fit(method, epochs, loaded, ckpt_dir=None, ckpt_path=None, strategy_kwargs=None, refit_epochs=None):
    """Train a fresh TinyNet with a fresh Trainer (and PycommCallback for a pycomm method); with
    ``refit_epochs``, call fit a second time on the same trainer up to that many epochs."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.plugins.environments import LightningEnvironment
    from pytorch_lightning.strategies import DDPStrategy

    from pycomm.lightning import PycommCallback

    torch.manual_seed(0)
    model = TinyNet(momentum=0.0 if method == "dgc" else 0.9)
    compress = PycommCallback(method, **METHODS[method]) if method in METHODS else None
    recorder = _Recorder(compress)
    callbacks = ([compress] if compress else []) + [recorder]
    if ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{epoch}", save_top_k=-1, every_n_epochs=1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD, num_nodes=1, max_epochs=epochs, callbacks=callbacks,
        strategy=DDPStrategy(cluster_environment=LightningEnvironment(), **(strategy_kwargs or {})),
        enable_progress_bar=False, logger=False, enable_model_summary=False,
        enable_checkpointing=bool(ckpt_dir), num_sanity_val_steps=0, default_root_dir=ckpt_dir)
    loaded.clear()
    trainer.fit(model, ckpt_path=ckpt_path)
    states = [compress.state if compress else None]
    if refit_epochs:
        trainer.fit_loop.max_epochs = refit_epochs
        trainer.fit(model)
        states.append(compress.state)
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "norms": recorder.norms, "bytes": recorder.bytes, "global_step": trainer.global_step,
            "iter": None if compress is None else compress.state.iter, "loaded": list(loaded),
            "reentry_kept_state": recorder.reentry_kept_state,
            "new_state_per_fit": len({id(s) for s in states}) == len(states)}


def _worker(rank, world, tmp):
    import warnings

    os.environ["LOCAL_RANK"] = str(rank)   # Lightning: the processes exist already, join them
    os.environ["NODE_RANK"] = "0"
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
    import pycomm
    from pytorch_lightning.strategies import DDPStrategy

    loaded = _spy_on_loads(pycomm)
    out = {}
    for name, (method, options) in RUNS.items():
        ckpt_dir = os.path.join(tmp, name.replace(", ", "-").replace(" ", "_"))
        continuous = _fit(method, EPOCHS, loaded, ckpt_dir=ckpt_dir, strategy_kwargs=options)
        torch.distributed.barrier()
        resumed = _fit(method, EPOCHS, loaded, ckpt_path=os.path.join(ckpt_dir, f"epoch={SAVED_EPOCH}.ckpt"),
                       strategy_kwargs=options)
        out[name] = {"continuous": continuous, "resumed": resumed}
    out["twice"] = _fit("dgc", SAVED_EPOCH, loaded, refit_epochs=SAVED_EPOCH + 1)
    # Lightning's own way, DDPStrategy(ddp_comm_hook=...), is ignored on CPU: the hook never runs
    state = pycomm.hooks.QuantState(bits=8)
    _fit("plain", 1, loaded,
         strategy_kwargs=dict(ddp_comm_state=state, ddp_comm_hook=pycomm.hooks.quantized_allreduce_hook))
    out["strategy_hook_iter"] = state.iter
    out["double_hook_error"] = _register_on_a_hooked_ddp()
    return out


def _register_on_a_hooked_ddp() -> str:
    """The callback's error when the DDP model has a comm hook already (as DDPStrategy(ddp_comm_hook=...)
    gives on CUDA); the trainer is a stand-in with only what on_fit_start reads."""
    from types import SimpleNamespace

    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel

    from pycomm.lightning import PycommCallback

    ddp = DistributedDataParallel(torch.nn.Linear(4, 4))
    ddp.register_comm_hook(None, allreduce_hook)
    try:
        PycommCallback("quant").on_fit_start(SimpleNamespace(strategy=SimpleNamespace(model=ddp)), None)
    except RuntimeError as e:
        return str(e)
    return "no error"


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ckpt")


@pytest.fixture(scope="module")
def runs(ckpt_root):
    return run_distributed(_worker, WORLD, str(ckpt_root), timeout=300)


def _max_diff(a, b) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _dense_bytes() -> float:
    numel = sum(p.numel() for p in TinyNet(0.0).parameters())
    return 2 * (WORLD - 1) / WORLD * 4 * numel      # a float32 ring all-reduce of every gradient


SAVED_STEP = (SAVED_EPOCH + 1) * STEPS_PER_EPOCH


@pytest.mark.parametrize("method", list(METHODS))
def test_callback_compresses_every_step(runs, method):
    steps = EPOCHS * STEPS_PER_EPOCH
    for r in runs:
        run = r[method]["continuous"]
        assert run["iter"] == steps                           # the hook ran once per step
        assert run["reentry_kept_state"] == [True]            # on_fit_start again: no second registration
        assert sorted(run["bytes"]) == list(range(1, steps + 1))
        if method == "quant":  # float32 for the first start_iter=2 steps, then 8-bit payloads (~1/4)
            assert all(b >= 0.9 * _dense_bytes() for s, b in run["bytes"].items() if s <= 2), run["bytes"]
            assert all(0 < b < 0.4 * _dense_bytes() for s, b in run["bytes"].items() if s > 2), run["bytes"]
        else:                                                 # pycomm's collectives (DDP's own are not seen)
            assert all(b > 0 for b in run["bytes"].values()), run["bytes"]
        assert set(r["plain"]["continuous"]["bytes"].values()) == {0}  # no callback: DDP's C++ all-reduce
    for k, v in runs[0][method]["continuous"]["params"].items():     # ranks agree bit for bit
        assert torch.equal(v, runs[1][method]["continuous"]["params"][k]), k


def test_lightning_ignores_a_strategy_comm_hook_on_cpu(runs):
    """Why the callback exists: DDPStrategy(ddp_comm_hook=...) is dropped on CPU, uncompressed training."""
    assert [r["strategy_hook_iter"] for r in runs] == [0, 0]


@pytest.mark.parametrize("method", list(METHODS))
def test_checkpoint_holds_every_rank_state_in_rank_order(runs, ckpt_root, method):
    """Rank 0 wrote the file; it holds both ranks' states (they differ), loadable with weights_only=True."""
    ckpt = torch.load(ckpt_root / method / f"epoch={SAVED_EPOCH}.ckpt", weights_only=True)
    entry = ckpt["callbacks"]["PycommCallback"]
    assert entry["method"] == method and entry["world_size"] == WORLD
    norms = [_state_norm(sd) ** 0.5 for sd in entry["rank_state_dicts"]]
    expected = [r[method]["continuous"]["norms"][SAVED_STEP] for r in runs]
    assert norms == pytest.approx(expected, rel=1e-12) and expected[0] > 0
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)   # per-rank state: the ranks' entries differ


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_gives_each_rank_its_own_state(runs, method):
    """fit(ckpt_path=...) loads rank r's saved entry into rank r's hook state, once, at fit start."""
    for r in runs:
        assert r[method]["resumed"]["loaded"] == pytest.approx([r[method]["continuous"]["norms"][SAVED_STEP]],
                                                               rel=1e-12)
        assert r[method]["continuous"]["loaded"] == []


@pytest.mark.parametrize("name", ["plain", "plain, fixed buckets"])
def test_plain_ddp_resume_is_exact(runs, name):
    for r in runs:
        assert r[name]["resumed"]["global_step"] == EPOCHS * STEPS_PER_EPOCH
        assert _max_diff(r[name]["resumed"]["params"], r[name]["continuous"]["params"]) == 0.0


@pytest.mark.parametrize("name", ["dgc", "quant, fixed buckets"])
def test_resume_matches_a_continuous_run(runs, name):
    """Same bound as plain DDP with the same DDP options (exact); the loaded state must be what the
    first resumed step uses.

    "dgc" runs with DDP's bucket rebuild: the resumed first step sees the model-order layout, the saved
    state came from the rebuilt one. It fails while hook state is keyed by DDP bucket (issue 13): the
    hook drops the loaded u and v without a word. Quant's result depends on the layout itself (its
    quantization groups and reduce-scatter chunks span the bucket), so quant is compared with fixed
    buckets, where the resumed run sees the saved layout and must be exact."""
    method, options = RUNS[name]
    plain = "plain, fixed buckets" if options else "plain"
    bound = max(_max_diff(r[plain]["resumed"]["params"], r[plain]["continuous"]["params"]) for r in runs)
    first = SAVED_STEP + 1
    for rank, r in enumerate(runs):
        continuous, resumed = r[name]["continuous"], r[name]["resumed"]
        assert resumed["iter"] == EPOCHS * STEPS_PER_EPOCH   # the step counter came back
        assert min(resumed["norms"]) == first
        # the loaded state was used: its norm after the first resumed step is the continuous run's
        assert resumed["norms"][first] == pytest.approx(continuous["norms"][first], rel=1e-6), (rank, first)
        assert _max_diff(resumed["params"], continuous["params"]) <= bound, rank


def test_second_fit_on_the_same_trainer_continues_the_state(runs):
    """fit, then fit again further: Lightning wraps the model in a new DDP, the callback registers on it
    and carries the DGC state over (the optimizer has no state of its own here), so the run equals one fit.

    The norm check fails while hook state is keyed by DDP bucket (issue 13), as for a resume."""
    first = STEPS_PER_EPOCH * SAVED_EPOCH + 1
    for rank, r in enumerate(runs):
        twice, continuous = r["twice"], r["dgc"]["continuous"]
        assert twice["new_state_per_fit"] and twice["reentry_kept_state"] == [True, True]
        assert twice["iter"] == twice["global_step"] == SAVED_STEP
        assert twice["norms"][first] == pytest.approx(continuous["norms"][first], rel=1e-6), rank


def test_a_ddp_model_with_a_comm_hook_already_is_refused_with_advice(runs):
    assert runs[0]["double_hook_error"] == (
        "PycommCallback('quant'): the DDP model already has a communication hook "
        "(DDPStrategy(ddp_comm_hook=...)?); use either the callback or the strategy's hook, not both")


def test_callback_errors_say_what_to_do():
    from pycomm.lightning import PycommCallback

    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*quant"):
        PycommCallback("nope")
    with pytest.raises(ValueError, match="pycomm state of method 'dgc', but this PycommCallback runs 'quant'"):
        PycommCallback("quant").load_state_dict({"method": "dgc", "world_size": 1, "rank_state_dicts": [{}]})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, callbacks=[PycommCallback("quant")],
                         enable_progress_bar=False, logger=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with pytest.raises(RuntimeError, match="SingleDeviceStrategy gave a TinyNet.*strategy='ddp'"):
        trainer.fit(TinyNet(0.0))


def test_import_pycomm_does_not_import_lightning():
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    script = ("import sys, pycomm; print(sorted(m for m in sys.modules "
              "if m.split('.')[0] in ('pytorch_lightning', 'lightning') or m == 'pycomm.lightning'))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
