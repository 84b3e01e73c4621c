"""Train state, optimizer, sharding and the jitted step, on the tiny net of tiny_training.py."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tiny_training as tiny

from ir_lora import losses, train_lib
from ir_lora import sharding as sharding_lib


def _opt_config(**overrides):
    config = {"lr": 1e-2, "b1": 0.9, "b2": 0.99, "warmup_steps": 1, "grad_clip_norm": 1.0}
    return ml_collections.ConfigDict({**config, **overrides})


def _run(mesh, *, steps=3, method=None, iterator=None, min_size_to_shard=2**18):
    """Runs `steps` steps: ((initial trainable, frozen) as numpy, state, frozen, metrics)."""
    method = method or tiny.make_method()
    iterator = iterator or tiny.CountingIterator()
    tx = train_lib.make_optimizer(_opt_config(), num_train_steps=10)
    state, frozen, state_sh, frozen_sh = train_lib.create_train_state(
        init_fn=method.init_fn, tx=tx, rng=0, mesh=mesh, min_size_to_shard=min_size_to_shard
    )
    initial = jax.tree.map(np.array, (state.trainable, frozen))
    step_fn = train_lib.make_train_step(
        apply_fn=method.apply_fn,
        objective=train_lib.restoration_objective(losses.l1),
        tx=tx,
        mesh=mesh,
        state_shardings=state_sh,
        frozen_shardings=frozen_sh,
        degrade_fn=method.degrade_fn,
    )
    all_metrics = []
    for _ in range(steps):
        batch = sharding_lib.make_global_batch(next(iterator), sharding_lib.data_sharding(mesh))
        state, metrics = step_fn(state, frozen, batch)
        all_metrics.append(metrics)
    return initial, state, frozen, all_metrics


@pytest.fixture(scope="module")
def eight_device_run():
    return _run(sharding_lib.make_mesh())


def test_one_device_and_eight_devices_and_fsdp_agree(eight_device_run):
    assert jax.device_count() == 8, "tests/conftest.py should simulate 8 CPU devices"
    (initial, _), one, _, _ = _run(sharding_lib.make_mesh(devices=jax.devices()[:1]))
    _, eight, _, _ = eight_device_run
    _, fsdp, _, _ = _run(sharding_lib.make_mesh({"fsdp": 2}), min_size_to_shard=64)
    # The fsdp run really shards the conv kernel (3, 3, 4, 3) on its size-4 axis.
    kernel = fsdp.trainable["conv_out"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "fsdp", None)
    assert int(one.step) == int(eight.step) == 3
    for other in (eight, fsdp):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5),
            one.trainable,
            other.trainable,
        )
    # Three steps of lr ~1e-2 moved the parameters well beyond the tolerance.
    moved = np.abs(one.trainable["conv_out"]["kernel"] - initial["conv_out"]["kernel"])
    assert moved.max() > 1e-3


def test_frozen_is_unchanged_and_absent_from_optimizer_state(eight_device_run):
    (_, frozen_before), state, frozen, metrics = eight_device_run
    # Never donated: still alive, and bit-identical to its initial value.
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(frozen))
    jax.tree.map(np.testing.assert_array_equal, frozen_before, jax.tree.map(np.asarray, frozen))
    # Adam's moments mirror the trainable tree only.
    adam = state.opt_state[1][0]
    assert isinstance(adam, optax.ScaleByAdamState)
    assert set(adam.mu) == set(adam.nu) == {"conv_out"}
    sizes = sum(x.size for x in jax.tree.leaves(state.opt_state))
    trainable_size = sum(x.size for x in jax.tree.leaves(state.trainable))
    # mu, nu, and two step counters (Adam, schedule); clipping and weight decay keep none.
    assert sizes == 2 * trainable_size + 2
    for m in metrics:
        values = m.compute()
        assert np.isfinite(values["loss"]) and values["l2_grads"] > 0 and values["nonfinite"] == 0


def test_degrade_fn_runs_inside_the_step():
    mesh = sharding_lib.make_mesh()
    method = tiny.make_method(degrade=True)
    iterator = tiny.CountingIterator(only_gt=True)
    gt = next(tiny.CountingIterator(only_gt=True))["gt"]
    (initial, _), state, frozen, metrics = _run(mesh, steps=1, method=method, iterator=iterator)

    # The loss the step must report: degrade with fold_in(fold_in(state rng, step 0), 0).
    @jax.jit
    def expected_losses(trainable, frozen, gt):
        step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
        lq, _ = method.degrade_fn(jax.random.fold_in(step_rng, 0), gt)
        degraded = losses.l1(method.apply_fn(trainable, frozen, lq), gt)
        return degraded, losses.l1(method.apply_fn(trainable, frozen, gt), gt)

    want, clean = expected_losses(initial, frozen, jnp.asarray(gt))
    np.testing.assert_allclose(metrics[0].compute()["loss"], want, rtol=1e-5)
    # The degradation matters: on the clean input the same net has a different loss.
    assert abs(float(clean) - float(want)) > 1e-3
    with pytest.raises(ValueError, match="'lq' but degrade_fn"):
        train_lib.train_step(
            state,
            frozen,
            next(tiny.CountingIterator()),
            apply_fn=method.apply_fn,
            objective=train_lib.restoration_objective(losses.l1),
            tx=optax.sgd(0.1),
            degrade_fn=method.degrade_fn,
        )


def test_schedule_and_optimizer_config():
    config = _opt_config(lr=1.0, warmup_steps=2, end_lr=0.1)
    schedule = train_lib.make_schedule(config, num_train_steps=10)
    values = jax.jit(jax.vmap(schedule))(jnp.array([0, 1, 2, 6, 10]))
    # Linear warm-up over 2 steps, then a cosine whose midpoint (step 6) is halfway to end_lr.
    np.testing.assert_allclose(values, [0.0, 0.5, 1.0, 0.55, 0.1], rtol=1e-6)
    with pytest.raises(ValueError, match="Unknown optimizer config keys: \\['beta1'\\]"):
        train_lib.make_optimizer(_opt_config(beta1=0.9), num_train_steps=10)
    with pytest.raises(ValueError, match="warmup_steps=10"):
        train_lib.make_schedule(_opt_config(warmup_steps=10), num_train_steps=10)
    # Decoupled weight decay with zero gradients: p <- p - lr * wd * p (torch AdamW).
    tx = train_lib.make_optimizer(
        _opt_config(lr=0.1, warmup_steps=0, weight_decay=0.5, end_lr=0.1), num_train_steps=10
    )
    params = {"w": jnp.array([2.0])}
    updates, _ = jax.jit(tx.update)({"w": jnp.zeros(1)}, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 * 2.0], rtol=1e-6)
    # Global-norm clipping to 1: a gradient of norm 10 reaches Adam as norm 1.
    clip = train_lib.make_optimizer(_opt_config(grad_clip_norm=1.0), num_train_steps=10)
    zeros = {"w": jnp.zeros(2)}
    clipped_state = jax.jit(clip.update)({"w": jnp.array([6.0, 8.0])}, clip.init(zeros), zeros)[1]
    np.testing.assert_allclose(clipped_state[1][0].mu["w"], 0.1 * np.array([0.6, 0.8]), rtol=1e-6)


def test_param_spec_and_mesh_errors():
    spec = sharding_lib.param_spec
    P = jax.sharding.PartitionSpec
    assert spec((64, 128), fsdp_size=1, min_size_to_shard=0) == P()
    assert spec((64, 128), fsdp_size=4, min_size_to_shard=0) == P(None, "fsdp")
    assert spec((6, 130), fsdp_size=4, min_size_to_shard=0) == P()  # nothing divisible
    assert spec((66, 130), fsdp_size=2, min_size_to_shard=0) == P(None, "fsdp")
    assert spec((64, 128), fsdp_size=4, min_size_to_shard=10**6) == P()  # too small
    with pytest.raises(ValueError, match="fsdp=3 must be a positive divisor of the device count 8"):
        sharding_lib.make_mesh({"fsdp": 3})
    mesh = sharding_lib.make_mesh()
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
    with pytest.raises(ValueError, match=r"\['gt'\] with local shape \(6, 8, 8, 3\).*devices 8"):
        sharding_lib.make_global_batch(
            {"gt": np.zeros((6, 8, 8, 3))}, sharding_lib.data_sharding(mesh)
        )


def test_maybe_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for key in ("JAX_COORDINATOR_ADDRESS", "IR_LORA_DISTRIBUTED", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "1")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    assert sharding_lib.maybe_initialize_distributed() is False


def test_maybe_initialize_distributed_reads_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert sharding_lib.maybe_initialize_distributed() is True
    assert calls == [{"num_processes": 4, "process_id": 2}]
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.delenv("JAX_NUM_PROCESSES")
    monkeypatch.delenv("JAX_PROCESS_ID")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert sharding_lib.maybe_initialize_distributed() is True
    assert calls[-1] == {}
