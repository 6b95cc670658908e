"""Ahead-of-time TPU compiles on this CPU machine (transformer.plan, experiments.plan).

The TPU compiler comes with the test extra (libtpu); a CI machine without it fails here rather than
skipping. Each compile is of a one-layer model at small shapes, a few seconds each.
"""

import os
import subprocess
import sys

import jax
import pytest

from experiments.configs import copy as copy_config, multi30k
from transformer import plan as plan_lib, sharding, tpu, training
from transformer.run_config import TrainConfig

if not tpu.have_compiler():
    if os.environ.get("CI"):
        pytest.fail("libtpu is missing: the test extra installs it (jax[tpu]).", pytrace=False)
    pytest.skip("libtpu not installed (pip install -e '.[test]' brings it)", allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLICE = tpu.get_slice("v5e-4")


def small_copy(**mesh):
    config = copy_config.get_config()
    config.model.update(num_encoder_layers=1, num_decoder_layers=1)
    config.mesh.update(**{"data": 1, "fsdp": 1, "tensor": 1, **mesh})
    return config


def state_bytes(run) -> int:
    """Bytes of the whole train state (parameters, Adam moments, step, rng), unsharded."""
    trainer = training.Trainer(run, run.model_config(), sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(trainer.abstract_state))


@pytest.fixture(scope="module")
def plans():
    """Train steps of the small copy model on v5e-4 under data, fsdp and tensor meshes; the tensor one
    in bfloat16 with splash attention (128-token rows)."""
    out = {}
    for name, mesh in (("data", dict(data=4)), ("fsdp", dict(fsdp=4)), ("tensor", dict(tensor=4))):
        config = small_copy(**mesh)
        if name == "tensor":
            config.model.update(dtype="bfloat16", attention="splash")
            config.data.max_length = 128
        out[name] = plan_lib.plan(TrainConfig.from_dict(config), SLICE, programs=("train",), log=lambda _: None)
    return out


@pytest.mark.parametrize("name, mesh", [("data", {"data": 4, "fsdp": 1, "tensor": 1}),
                                        ("fsdp", {"data": 1, "fsdp": 4, "tensor": 1}),
                                        ("tensor", {"data": 1, "fsdp": 1, "tensor": 4})])
def test_compiles_for_a_4_chip_topology_under_each_mesh(plans, name, mesh):
    p = plans[name]
    assert p.mesh_shape == mesh
    (train,) = p.programs
    assert train.name == "train step"
    assert train.flops > 0 and train.bytes_accessed > 0
    assert 0 < train.total_bytes < SLICE.chip.hbm_bytes and p.all_fit
    # Parameters + Adam moments: all of them on every chip under data parallelism, about a quarter otherwise.
    total = state_bytes(p.run)
    if name == "data":
        assert train.state_bytes == total
    else:
        assert total / 4 <= train.state_bytes < total / 2
    fast, slow = p.estimate(overlap=True), p.estimate(overlap=False)
    assert 0 < fast["step_seconds"] <= slow["step_seconds"] and 0 < slow["mfu"] <= fast["mfu"] < 1
    assert "ESTIMATE" in plan_lib.report(p)


def test_fsdp_train_step_gathers_parameters_and_scatters_gradients(plans):
    collectives = plans["fsdp"].programs[0].hlo.collectives
    assert collectives["all-gather"].count > 0
    assert collectives["reduce-scatter"].count > 0
    data = plans["data"].programs[0].hlo.collectives  # pure data parallelism: gradients are all-reduced
    assert data["all-reduce"].count > 0 and data["all-gather"].count == 0 and data["reduce-scatter"].count == 0


def test_bfloat16_and_splash_attention_compile_for_tpu(plans):
    """bfloat16 compute; the Pallas kernel lowers through Mosaic (not interpret mode) inside the
    train step, per shard of the tensor mesh: forward and backward kernels of the encoder's, the
    decoder's and the cross attention."""
    p = plans["tensor"]
    assert p.run.model.dtype == "bfloat16" and p.run.model.attention == "splash" and p.programs[0].flops > 0
    assert p.programs[0].hlo.pallas_kernels >= 6
    assert plans["data"].programs[0].hlo.pallas_kernels == 0  # 16-token rows: XLA's attention


def test_auto_dtype_lowers_to_bfloat16_for_tpu_from_a_cpu_without_it(monkeypatch):
    """`model.dtype="auto"` resolves for the devices the step is traced for, not for the host: the
    train step lowered for a TPU topology computes in bfloat16, the same step for this CPU (told it
    has no bfloat16 instructions) in float32."""
    monkeypatch.setattr(training.runtime, "cpu_has_fast_bfloat16", lambda: False)
    config = small_copy()
    config.model.dtype = "auto"
    run = TrainConfig.from_dict(config)
    texts = {}
    for name, devices in (("tpu", tpu.topology_devices(SLICE)[:1]), ("cpu", jax.devices()[:1])):
        trainer = training.Trainer(run, run.model_config(), sharding.make_mesh(1, 1, 1, devices=devices))
        batch = plan_lib.train_batch_shape(run, 1).specs(trainer.batch_sharding)
        with trainer.context():
            texts[name] = trainer._train_step.lower(trainer.abstract_state, batch).as_text()
    assert "bf16" in texts["tpu"] and "bf16" not in texts["cpu"]


def test_decode_and_eval_compile_for_translation_on_real_data():
    config = multi30k.get_config("hour")
    config.model.update(num_encoder_layers=1, num_decoder_layers=1, d_model=64, d_ff=128)
    config.data.update(vocab_size=2048, max_length=16, eval_batch_size=8)
    config.decode.update(batch_size=6, beam_size=2)
    run = TrainConfig.from_dict(config)
    p = plan_lib.plan(run, SLICE, programs=("eval", "decode"), log=lambda _: None)
    names = [prog.name for prog in p.programs]
    assert names == ["eval step", "decode (beam 2, 8 x 16)"]  # 6 sentences rounded up to the 4 batch shards
    assert all(prog.flops > 0 and prog.total_bytes > 0 for prog in p.programs)


def test_a_batch_that_does_not_split_over_the_mesh_is_refused():
    config = small_copy(data=4)
    config.data.batch_size = 30
    with pytest.raises(plan_lib.PlanError, match="30 rows.*4 batch shards"):
        plan_lib.plan(TrainConfig.from_dict(config), SLICE, programs=("train",), log=lambda _: None)


def test_oversized_batch_exits_non_zero_naming_the_levers():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.plan", "--config=experiments/configs/copy.py", "--topology=v5e-4",
         "--programs=train", "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
         "--config.data.batch_size=65536", "--config.data.max_length=256", "--config.model.d_model=256",
         "--config.model.max_len=256"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "DOES NOT FIT" in result.stdout
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1
    for lever in ("mesh.fsdp", "model.remat", "batch_size", "grad_accum_steps"):
        assert lever in error[0]


@pytest.mark.parametrize("name, chips, hosts, topology", [
    ("v5e-8", 8, 1, "v5e:2x4"), ("v5litepod-16", 16, 4, "v5e:4x4"), ("v4-8", 4, 1, "v4:2x2x1"),
    ("v4-32", 16, 4, "v4:2x2x4"), ("v5p-8", 4, 1, "v5:2x2x1"), ("v6e-8", 8, 1, "v6e:2x4"),
    ("v5e:2x2", 4, 1, "v5e:2x2")])
def test_slices_by_accelerator_type_or_topology(name, chips, hosts, topology):
    s = tpu.get_slice(name)
    assert (s.num_chips, s.num_hosts, s.topology) == (chips, hosts, topology)


@pytest.mark.parametrize("name", ["v5e-7", "v4-9", "v9-8", "tpu", "v5e:2x2x2"])
def test_unknown_slices_are_refused(name):
    with pytest.raises(tpu.TopologyError):
        tpu.get_slice(name)


def test_topology_devices_are_one_per_chip_across_hosts():
    devices = tpu.topology_devices(tpu.get_slice("v4-32"))
    assert len(devices) == 16 and {d.device_kind for d in devices} == {"TPU v4"}
    assert len({d.process_index for d in devices}) == 4


def test_a_multi_host_slice_compiles_from_one_process():
    v5e_16 = tpu.get_slice("v5e-16")
    assert v5e_16.num_hosts == 4
    p = plan_lib.plan(TrainConfig.from_dict(small_copy(data=16)), v5e_16, programs=("train",), log=lambda _: None)
    assert p.mesh_shape["data"] == 16 and p.all_fit
    assert p.programs[0].hlo.collectives["all-reduce"].count > 0


def test_without_libtpu_the_plan_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(tpu, "have_compiler", lambda: False)
    with pytest.raises(tpu.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
        tpu.topology_devices(SLICE)


HLO = """\
HloModule step

%body (p: (s32[], f32[64,128])) -> (s32[], f32[64,128]) {
  %p = (s32[], f32[64,128]{1,0}) parameter(0)
  %x = f32[64,128]{1,0} get-tuple-element(%p), index=1
  %ag = f32[128,128]{1,0} all-gather(%x), replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}
  %y = f32[64,128]{1,0} fusion(%ag, %x), kind=kLoop, calls=%fused, metadata={op_name="jit(train_step)/jvp(M)/decoder/layer_3/feed_forward/dot"}
  ROOT %t = (s32[], f32[64,128]{1,0}) tuple(%i, %y)
}

%all-reduce-scatter.1 (a: f32[64,128]) -> f32[16,128] {
  %a = f32[64,128]{1,0} parameter(0)
  ROOT %ar = f32[64,128]{1,0} all-reduce(%a), replica_groups=[2,4]<=[8]
}

ENTRY %main (w: f32[64,128]) -> f32[16,128] {
  %w = f32[64,128]{1,0} parameter(0)
  %loop = (s32[], f32[64,128]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"6"}}
  %g = f32[64,128]{1,0} get-tuple-element(%loop), index=1
  %ars = f32[16,128]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.1
  %cp = f32[64,128]{1,0} copy-start(%g)
  ROOT %done = f32[16,128]{1,0} all-reduce(%ars), replica_groups={{0,1,2,3,4,5,6,7}}
}
"""


def test_hlo_summary_counts_collectives_groups_and_loop_trips():
    h = plan_lib.summarise_hlo(HLO, num_devices=8)
    c = h.collectives
    assert (c["all-gather"].count, c["reduce-scatter"].count, c["all-reduce"].count) == (1, 1, 1)
    # The all-gather runs 6 times (the loop's trip count) over groups of 2 (axis_0): half its result each time.
    assert c["all-gather"].ici_bytes == 6 * 128 * 128 * 4 / 2
    assert c["reduce-scatter"].ici_bytes == 16 * 128 * 4 * 3  # iota groups of 4: (n - 1) shards sent
    assert c["all-reduce"].ici_bytes == 2 * 16 * 128 * 4 * 7 / 8
    sources = dict((name, b) for b, name in h.largest)
    # The loop body's fusion: its operands and result, 6 times, labelled by where it comes from.
    assert sources["decoder/layer_*/feed_forward/dot"] == 6 * (64 * 128 + 128 * 128 + 64 * 128) * 4
