"""Multi-host: ``v4jax.parallel.distributed.initialize`` and real multi-process runs on this box
(two processes over loopback, 4 simulated CPU devices each, gloo collectives).

* CI: two processes build one global 8-device mesh, feed their rows of a real data batch
  (``process_rows`` + ``put_batch``), run a jitted sharded computation that must equal the same
  computation in this (one) process, write one orbax checkpoint of sharded arrays together and
  restore it onto another mesh (in both processes, and here on one); only process 0 writes metrics.
* slow: ``v4jax-train`` in two processes against one process of 8 devices (same mesh): same losses,
  same checkpoint; then a one-process resume on another mesh continues it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from v4jax.config import ConfigError
from v4jax.parallel.distributed import detect_cluster, initialize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DIST_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_LOCAL_DEVICE_IDS",
             "V4JAX_DISTRIBUTED", "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST", "SLURM_PROCID",
             "SLURM_LOCALID", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
             "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_PROCESS_ADDRESSES_PATH",
             "MEGASCALE_NUM_SLICES", "MEGASCALE_COORDINATOR_ADDRESS")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(n_devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n_devices}",
               PYTHONPATH=os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return env


def run_all(cmds: list[list[str]], env: dict, timeout: float) -> list[str]:
    """Start every command at once, wait for all; any failure (or a timeout) kills the rest and
    fails the test with every process's output."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for c in cmds]
    outs = [""] * len(procs)
    deadline = time.time() + timeout
    try:
        for i, p in enumerate(procs):
            outs[i], _ = p.communicate(timeout=max(deadline - time.time(), 1))
            if p.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    bad = [i for i, p in enumerate(procs) if p.returncode != 0]
    if bad:
        tails = "\n".join(f"--- process {i} (rc {procs[i].returncode}) ---\n{outs[i][-6000:]}" for i in range(len(procs)))
        pytest.fail(f"process(es) {bad} failed:\n{tails}")
    return outs


# ----------------------------------------------------------------------------------------------
# initialize(): argument checks and cluster detection (no processes)


@pytest.fixture
def clean_env(monkeypatch):
    for k in _DIST_ENV:
        monkeypatch.delenv(k, raising=False)


def test_detect_cluster():
    assert detect_cluster({}) is None
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert detect_cluster({**slurm, "SLURM_NTASKS": "4"}) == "slurm"
    assert detect_cluster({**slurm, "SLURM_NTASKS": "1"}) is None                    # a one-task job
    assert detect_cluster({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}) is None         # sbatch script, no srun step
    ompi = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    assert detect_cluster({**ompi, "OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
    assert detect_cluster({**ompi, "OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}) == "tpu"
    assert detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None               # one-host TPU VM
    assert detect_cluster({"MEGASCALE_NUM_SLICES": "2"}) == "tpu"


def test_initialize_argument_errors(clean_env):
    jax.devices()      # the backend is up in this process: nothing below may reach jax.distributed
    assert initialize(environ={}) is False                                          # nothing to do
    assert initialize(num_processes=1, environ={}) is False
    assert initialize("127.0.0.1:1234", 1, 0, environ={}) is False
    for kw, msg in [(dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=2), "out of range"),
                    (dict(coordinator="127.0.0.1:1234", num_processes=2, process_id=-1), "process_id must be >= 0"),
                    (dict(coordinator="127.0.0.1:1234", num_processes=0, process_id=0), "num_processes must be >= 1"),
                    (dict(num_processes=2, process_id=0), "--coordinator HOST:PORT"),
                    (dict(coordinator="127.0.0.1:1234", num_processes=2), "--process-id"),
                    (dict(coordinator="127.0.0.1", num_processes=2, process_id=0), "not HOST:PORT"),
                    (dict(coordinator="127.0.0.1:99999", num_processes=2, process_id=0), "not HOST:PORT"),
                    (dict(coordinator="h:1", num_processes="two", process_id=0), "must be an integer"),
                    (dict(coordinator="h:1", num_processes=2, process_id=0, local_device_ids="0,x"), "integer")]:
        with pytest.raises(ConfigError, match=msg):
            initialize(environ={}, **kw)
    # the same from the environment variables
    with pytest.raises(ConfigError, match="out of range"):
        initialize(environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476", "JAX_NUM_PROCESSES": "2",
                            "JAX_PROCESS_ID": "3"})
    with pytest.raises(ConfigError, match="--coordinator"):
        initialize(environ={"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"})
    # consistent settings, but JAX already runs here: a clear error instead of JAX's RuntimeError
    with pytest.raises(ConfigError, match="before any JAX computation"):
        initialize("127.0.0.1:1234", 2, 1, environ={})


def test_train_cli_rejects_bad_distributed_flags(clean_env, tmp_path, capsys):
    from v4jax.train.cli import train_main

    rc = train_main(["--workdir", str(tmp_path / "w"), "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                     "--process-id", "2"])
    assert rc == 2 and "process_id 2 is out of range for 2 process(es)" in capsys.readouterr().err
    rc = train_main(["--workdir", str(tmp_path / "w"), "--num-processes", "2", "--process-id", "0"])
    assert rc == 2 and "--coordinator HOST:PORT" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# CI: two real processes, one global mesh

MESH, OTHER_MESH, B, SEQ = "data=2,fsdp=2,expert=2", "fsdp=4,expert=2", 8, 16
DATA_SETTINGS = ["tokenizer=byte", f"seq_len={SEQ}", f"batch_size={B}"]


def weights() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((SEQ, 24)).astype(np.float32)


def sharded_fn(mesh):
    """A jitted computation over the mesh: rows split over the batch axes, the weight over
    fsdp x expert, the contraction all-reduced across processes; replicated out."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rep = NamedSharding(mesh, P())

    @jax.jit
    def f(tokens, w):
        x = tokens[:, :SEQ].astype(jnp.float32) / 259.0
        y = jnp.tanh(x @ w)
        return jax.lax.with_sharding_constraint(jnp.sum(y * y, axis=1) + jnp.mean(y), rep)

    return f, NamedSharding(mesh, P("fsdp", "expert"))


CHILD = textwrap.dedent("""
    import json, os, sys
    coordinator, pid, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    from v4jax.parallel.distributed import initialize, process_info
    assert initialize(coordinator, 2, pid, initialization_timeout=120) is True
    assert initialize(coordinator, 2, pid) is True                  # idempotent
    import jax, numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P
    import test_multihost as T
    from v4jax.parallel.mesh import make_mesh, process_rows, put_batch
    from v4jax.train.config import train_preset
    from v4jax.train.loop import checkpoint_manager, make_data
    from v4jax.data.pipeline import make_dataset
    from v4jax.train.metrics import MetricsWriter

    info = process_info()
    assert info == {"process_index": pid, "process_count": 2, "local_devices": 4, "devices": 8}, info
    mesh = make_mesh(T.MESH)
    lo, hi = process_rows(mesh, T.B)
    cfg = train_preset("tiny", T.DATA_SETTINGS)
    local = next(make_data(cfg, "train", mesh))                  # only this process's rows
    full = next(make_dataset("train", T.SEQ, T.B, seed=cfg.seed, tokenizer="byte", shuffle=True))
    assert local["tokens"].shape == (hi - lo, T.SEQ + 1)
    np.testing.assert_array_equal(local["tokens"], full["tokens"][lo:hi])
    batch = put_batch(local, mesh, T.B)
    assert batch["tokens"].shape == (T.B, T.SEQ + 1) and not batch["tokens"].is_fully_addressable

    f, w_sh = T.sharded_fn(mesh)
    w = jax.make_array_from_callback(T.weights().shape, w_sh, lambda idx: T.weights()[idx])
    y = f(batch["tokens"], w)
    rep = NamedSharding(mesh, P())
    gathered = jax.jit(lambda t: t, out_shardings=rep)(batch["tokens"])
    np.testing.assert_array_equal(np.asarray(gathered), full["tokens"])   # the global batch

    # one checkpoint written by both processes, restored onto another mesh
    mngr = checkpoint_manager(os.path.join(out_dir, "ckpt"))
    mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": w, "tokens": batch["tokens"], "y": y})))
    mngr.wait_until_finished()
    other = make_mesh(T.OTHER_MESH)
    target = {"w": jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=NamedSharding(other, P(None, ("fsdp", "expert")))),
              "tokens": jax.ShapeDtypeStruct(batch["tokens"].shape, np.int32, sharding=NamedSharding(other, P("fsdp"))),
              "y": jax.ShapeDtypeStruct(y.shape, y.dtype, sharding=NamedSharding(other, P()))}
    got = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    mngr.close()
    assert got["w"].sharding.mesh.shape == other.shape
    back = jax.jit(lambda a, b: (a, b), out_shardings=(NamedSharding(other, P()),) * 2)(got["w"], got["tokens"])
    np.testing.assert_array_equal(np.asarray(back[0]), T.weights())
    np.testing.assert_array_equal(np.asarray(back[1]), full["tokens"])
    np.testing.assert_array_equal(np.asarray(got["y"]), np.asarray(y))

    w2 = MetricsWriter(out_dir, tensorboard=False)
    assert w2.primary == (pid == 0)
    w2.write({"step": 1, "loss": float(np.asarray(y).sum()), "process": pid})
    with open(os.path.join(out_dir, f"p{pid}.json"), "w") as fh:
        json.dump({"rows": [lo, hi], "y": np.asarray(y).tolist(), "tokens": full["tokens"].tolist()}, fh)
    print("child", pid, "ok")
""")


def test_two_processes_global_mesh_batch_compute_and_checkpoint(tmp_path):
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from v4jax.data.pipeline import make_dataset
    from v4jax.parallel.mesh import make_mesh
    from v4jax.train.loop import checkpoint_manager
    from v4jax.train.metrics import read_metrics

    # build the data cache here first: two processes preparing a cold TFDS directory at once race
    next(make_dataset("train", SEQ, B, tokenizer="byte", shuffle=True))
    port, t0 = free_port(), time.perf_counter()
    cmds = [[sys.executable, "-c", CHILD, f"127.0.0.1:{port}", str(i), str(tmp_path)] for i in range(2)]
    env = child_env(4)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "tests"), env["PYTHONPATH"]])
    outs = run_all(cmds, env, timeout=240)
    print(f"two processes: {time.perf_counter() - t0:.1f} s")
    assert all(f"child {i} ok" in o for i, o in enumerate(outs)), outs
    res = [json.load(open(tmp_path / f"p{i}.json")) for i in range(2)]
    assert [r["rows"] for r in res] == [[0, 4], [4, 8]]
    assert res[0]["y"] == res[1]["y"]

    # the same computation in this one process over 8 devices and the same mesh
    mesh = make_mesh(MESH)
    tokens = np.asarray(res[0]["tokens"], np.int32)
    f, w_sh = sharded_fn(mesh)
    from v4jax.parallel.mesh import put_batch

    y1 = np.asarray(f(put_batch({"tokens": tokens}, mesh)["tokens"], jax.device_put(weights(), w_sh)))
    np.testing.assert_allclose(np.asarray(res[0]["y"]), y1, rtol=1e-5, atol=0)
    x = tokens[:, :SEQ].astype(np.float64) / 259.0
    ref = np.tanh(x @ weights().astype(np.float64))
    np.testing.assert_allclose(y1, (ref * ref).sum(1) + ref.mean(), rtol=1e-5)

    # the two-process checkpoint restored here: one process, another mesh
    other = make_mesh(OTHER_MESH)
    target = {"w": jax.ShapeDtypeStruct((SEQ, 24), jnp.float32, sharding=NamedSharding(other, P("fsdp", "expert"))),
              "tokens": jax.ShapeDtypeStruct(tokens.shape, jnp.int32, sharding=NamedSharding(other, P(("fsdp", "expert")))),
              "y": jax.ShapeDtypeStruct((B,), jnp.float32, sharding=NamedSharding(other, P("fsdp")))}
    mngr = checkpoint_manager(str(tmp_path / "ckpt"))
    assert mngr.latest_step() == 1
    got = mngr.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    mngr.close()
    np.testing.assert_array_equal(np.asarray(got["w"]), weights())
    np.testing.assert_array_equal(np.asarray(got["tokens"]), tokens)
    np.testing.assert_array_equal(np.asarray(got["y"]), np.asarray(res[0]["y"], np.float32))
    assert got["w"].sharding == target["w"].sharding

    rows = read_metrics(str(tmp_path))     # both processes wrote; only process 0's row is there
    assert [(r["step"], r["process"]) for r in rows] == [(1, 0)]


# ----------------------------------------------------------------------------------------------
# slow: the whole v4jax-train in two processes

TRAIN_SETTINGS = [
    "model.n_layers=2", 'model.layer_types=["csa","hca"]', "model.n_hash_layers=1", "model.n_mtp_layers=0",
    "model.dim=32", "model.n_heads=2", "model.head_dim=16", "model.q_lora_rank=16", "model.o_lora_rank=8",
    "model.index_n_heads=4", "model.index_head_dim=8", "model.moe_inter_dim=16", "model.vocab_size=320",
    "model.rope_head_dim=8", "model.window_size=8", "model.hca_ratio=8", "model.index_topk=3", "model.o_groups=2",
    "model.n_routed_experts=8", "model.original_seq_len=16", "model.max_seq_len=64", "tokenizer=byte",
    "seq_len=16", "batch_size=8", "total_steps=2", "eval_batches=1", "log_every=1", "checkpoint_every=2"]


def train_cmd(workdir, mesh, *extra) -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "v4jax-train")
    return ([exe, "--config", "tiny", "--workdir", str(workdir), "--mesh", mesh, "--no-progress"]
            + [f"--set={s}" for s in TRAIN_SETTINGS] + list(extra))


def test_train_settings_validate():
    from v4jax.train.config import train_preset

    cfg = train_preset("tiny", TRAIN_SETTINGS)
    assert cfg.model.layer_types == ("csa", "hca") and cfg.batch_size == 8 and cfg.total_steps == 2


def _rel(a, b) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


@pytest.mark.slow
def test_v4jax_train_two_processes_equals_one_process_and_resumes_elsewhere(tmp_path):
    from v4jax.data.pipeline import make_dataset
    from v4jax.parallel.placement import logical_specs
    from v4jax.train.config import TrainConfig
    from v4jax.train.loop import CONFIG_FILE, abstract_params, checkpoint_manager, restore_checkpoint
    from v4jax.train.metrics import read_metrics
    from v4jax.train.optimizer import make_optimizer

    next(make_dataset("train", SEQ, B, tokenizer="byte", shuffle=True))        # warm the data cache
    two, one = tmp_path / "two", tmp_path / "one"
    port, t0 = free_port(), time.perf_counter()
    run_all([train_cmd(two, MESH, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                       "--process-id", str(i)) for i in range(2)], child_env(4), timeout=900)
    t1 = time.perf_counter()
    run_all([train_cmd(one, MESH)], child_env(8), timeout=600)
    t2 = time.perf_counter()
    print(f"v4jax-train: two processes {t1 - t0:.0f} s, one process {t2 - t1:.0f} s")

    a, b = read_metrics(str(two)), read_metrics(str(one))
    assert [(r["step"], bool(r.get("eval"))) for r in a] == [(0, True), (1, False), (2, False), (2, True)]
    assert [(r["step"], bool(r.get("eval"))) for r in b] == [(r["step"], bool(r.get("eval"))) for r in a]
    for ra, rb in zip(a, b):
        for k in ("loss", "lm_loss", "grad_norm"):
            if k in rb:
                assert _rel(ra[k], rb[k]) < 1e-5, (k, ra, rb)

    # the two checkpoints hold the same state (up to the order of float32 sums: within 1e-5 of
    # each leaf's largest value here; the updates themselves are ~peak_lr = 3e-4)
    cfg = TrainConfig.from_json(str(one / CONFIG_FILE))
    tx = make_optimizer(cfg.optim, abstract_params(cfg), logical_specs(cfg.model))
    states = []
    for wd in (two, one):
        mngr = checkpoint_manager(str(wd))
        assert mngr.latest_step() == 2
        states.append(restore_checkpoint(mngr, 2, cfg, tx)[0])
        mngr.close()
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(states[0]), jax.tree_util.tree_leaves(states[1])):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert np.abs(x - y).max() <= 1e-4 * np.abs(y).max(), jax.tree_util.keystr(path)

    # one process, another mesh, goes on from the two-process checkpoint
    out = run_all([train_cmd(two, OTHER_MESH, "--steps", "3")], child_env(8), timeout=600)[0]
    print(f"resume on {OTHER_MESH}: {time.perf_counter() - t2:.0f} s")
    assert "resumed" in out and "at step 2" in out, out
    rows = read_metrics(str(two))
    assert [r["step"] for r in rows if not r.get("eval")] == [1, 2, 3]
    assert np.isfinite([r["loss"] for r in rows]).all()
    mngr = checkpoint_manager(str(two))
    assert mngr.latest_step() == 3
    mngr.close()


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_with_a_checkpoint(tmp_path):
    """A preemption notice reaching one process only (process 1, which logs nothing): JAX's
    preemption sync service picks one step for both, both write the checkpoint together and exit
    0, and the workdir resumes."""
    import signal

    from v4jax.train.checkpoints import committed_steps, verify_step

    work, port = tmp_path / "run", free_port()
    env = child_env(4)
    procs = [subprocess.Popen(train_cmd(work, MESH, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                        "--process-id", str(i), "--steps", "40", "--set=total_steps=40",
                                        "--set=checkpoint_every=20"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for i in range(2)]
    lines, deadline = [], time.time() + 900
    try:
        for line in procs[0].stdout:
            lines.append(line)
            if "v4jax-train: step 3: loss" in line:
                procs[1].send_signal(signal.SIGTERM)
                break
            assert time.time() < deadline, "".join(lines)
        out0 = "".join(lines) + procs[0].communicate(timeout=600)[0]
        out1 = procs[1].communicate(timeout=600)[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 0 and procs[1].returncode == 0, (out0, out1)
    res = json.loads(out0.strip().splitlines()[-1])
    assert res["stopped_by"] == "SIGTERM" and 3 < res["step"] < 20, res
    assert committed_steps(str(work)) == [res["step"]]
    assert verify_step(str(work / str(res["step"])))[0] == "ok"
    out = run_all([train_cmd(work, OTHER_MESH, "--steps", str(res["step"] + 1), "--set=total_steps=40",
                             "--set=checkpoint_every=20")], child_env(8), timeout=600)[0]
    assert f"at step {res['step']}" in out, out
