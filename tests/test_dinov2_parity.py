"""The self-supervised losses (SigLIP 2 §2.3) against DINOv2's published loss code (PyPI
dinov2==0.0.1.dev2: dinov2/loss/dino_clstoken_loss.py, ibot_patch_loss.py): Sinkhorn-Knopp
teacher targets, the DINO cross-entropy and the iBOT masked-patch loss equal to 1e-6 on random
scores; and the objectives' `__call__` (what the train step runs) on a batch sharded over 8
devices equals the 1-device result and DINOv2's loss on the global batch (not per device).

Needs the `parity` extra (torch) and dinov2 (`pip install --no-deps dinov2==0.0.1.dev2`, as
.ci/run does). DINOv2's `iBOTPatchLoss.sinkhorn_knopp_teacher` calls `dist.all_reduce`
unguarded (DINOLoss checks `dist.is_initialized()`), so the module runs inside a world-size-1
gloo process group: all_reduce is then the identity and DINOv2's code runs unmodified.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from extras import require
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from siglip_jax.models.two_towers import Model
from siglip_jax.objectives import distillation, masked, selfsup
from siglip_jax.objectives.base import ObjectiveInputs
from siglip_jax.objectives.options import check_options
from siglip_jax.sharding import make_mesh

torch = require("torch")
dinov2_loss = require("dinov2.loss")

TEACHER_TEMP, STUDENT_TEMP, K = 0.04, 0.1, 16
TEMPS = dict(teacher_temp=TEACHER_TEMP, student_temp=STUDENT_TEMP)

MODEL = dict(
    image=dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8, pool_type="map"),
    text=dict(vocab_size=32, width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="last"),
    out_dim=16)
TINY = Model(**MODEL)
HEAD = dict(head_hidden=24, head_bottleneck=8, head_layers=3, prototypes=K, **TEMPS,
            global_key="image")  # The teacher sees batch["image"] (tests/test_views.py: the view).


@pytest.fixture(scope="module", autouse=True)
def single_process_group(tmp_path_factory):
    """A world-size-1 torch.distributed group for DINOv2's all_reduce calls."""
    store = tmp_path_factory.mktemp("torch_dist") / "store"
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=0,
                                         world_size=1)
    yield
    torch.distributed.destroy_process_group()


# Jitted once each (eagerly every jnp op would compile on its own).
targets_fn = jax.jit(selfsup.teacher_targets, static_argnums=(1, 2))
distillation_fn = jax.jit(functools.partial(selfsup.distillation_loss, **TEMPS),
                          static_argnames="centering")
masked_fn = jax.jit(functools.partial(selfsup.masked_patch_loss, **TEMPS),
                    static_argnames="centering")


def _scores(shape, seed):
    """Prototype scores as the heads give them: cosines in [-1, 1], float32."""
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _t(x):
    return torch.from_numpy(np.array(x))  # A writable copy.


def _dino_targets(scores, centering):
    """DINOv2's teacher targets of the class-token head scores [n, K]."""
    loss = dinov2_loss.DINOLoss(scores.shape[-1])
    if centering == "sinkhorn":
        return loss.sinkhorn_knopp_teacher(_t(scores), teacher_temp=TEACHER_TEMP)
    return loss.softmax_center_teacher(_t(scores), teacher_temp=TEACHER_TEMP)  # Centre 0.


def _dino_loss(teacher_bxk, student_bxnxk, centering):
    """DINOv2's local-crops DINO loss: one teacher view, n student views (chunks [B, K] as
    `student_local_cls_tokens_after_head.chunk(n_local_crops)`), divided by the n·1 loss
    terms as `ssl_meta_arch.forward_backward` divides it."""
    n = student_bxnxk.shape[1]
    targets = _dino_targets(teacher_bxk, centering)
    loss = dinov2_loss.DINOLoss(teacher_bxk.shape[-1], student_temp=STUDENT_TEMP)
    with torch.no_grad():
        total = loss([_t(student_bxnxk[:, v]) for v in range(n)], [targets])
    return float(total) / (n * 1)


def _ibot_loss(teacher_bxnxk, student_bxnxk, mask_bxn, centering):
    """DINOv2's iBOT loss: the masked patches in row-major order (`collated_masks.flatten()
    .nonzero()`), targets over all of them, `forward_masked` with its default weights
    1/(masked patches of the image)."""
    mask = _t(mask_bxn)
    teacher, student = _t(teacher_bxnxk)[mask], _t(student_bxnxk)[mask]
    n_masked = int(mask.sum())
    loss = dinov2_loss.iBOTPatchLoss(teacher.shape[-1], student_temp=STUDENT_TEMP)
    if centering == "sinkhorn":
        targets = loss.sinkhorn_knopp_teacher(
            teacher, teacher_temp=TEACHER_TEMP,
            n_masked_patches_tensor=torch.full((1,), n_masked, dtype=torch.long))
    else:
        targets = loss.softmax_center_teacher(teacher[None], teacher_temp=TEACHER_TEMP)[0]
    with torch.no_grad():
        return float(loss.forward_masked(student, targets, student_masks_flat=mask,
                                         n_masked_patches=n_masked))


# ----------------------------------------------------------------------------- random scores


@pytest.mark.parametrize("rows", [1, 6, 40])
def test_sinkhorn_targets_equal_dinov2(rows):
    scores = _scores((rows, K), rows)
    got = np.asarray(targets_fn(scores, TEACHER_TEMP, "sinkhorn"))
    np.testing.assert_allclose(got, _dino_targets(scores, "sinkhorn").numpy(), rtol=1e-6,
                               atol=1e-6)
    ibot = dinov2_loss.iBOTPatchLoss(K).sinkhorn_knopp_teacher(
        _t(scores), teacher_temp=TEACHER_TEMP,
        n_masked_patches_tensor=torch.full((1,), rows, dtype=torch.long))
    np.testing.assert_allclose(got, ibot.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)


def test_softmax_targets_equal_dinov2_at_its_initial_centre():
    """centering="softmax" sharpens only: DINOv2's softmax_center_teacher with its centre
    still at its initial 0 (DINOv2 then moves the centre by EMA; ours keeps none)."""
    scores = _scores((6, K), 1)
    got = targets_fn(scores, TEACHER_TEMP, "softmax")
    np.testing.assert_allclose(got, _dino_targets(scores, "softmax").numpy(), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_dino_cross_entropy_equals_dinov2(centering):
    teacher, student = _scores((5, K), 2), _scores((5, 3, K), 3)
    got = distillation_fn(teacher, student, centering=centering)
    np.testing.assert_allclose(float(got), _dino_loss(teacher, student, centering), rtol=1e-6)


@pytest.mark.parametrize("centering", ["sinkhorn", "softmax"])
def test_ibot_masked_patch_loss_equals_dinov2(centering):
    b, n = 3, 8
    teacher, student = _scores((b, n, K), 4), _scores((b, n, K), 5)
    mask, ids = masked.random_mask(jax.random.key(0), b, n, 0.5)  # The objective's masks.
    pick = lambda x: np.take_along_axis(x, np.asarray(ids)[..., None], axis=1)
    got = masked_fn(pick(teacher), pick(student), centering=centering)
    np.testing.assert_allclose(float(got), _ibot_loss(teacher, student, mask, centering),
                               rtol=1e-6)


# ----------------------------------------------------------------------------- sharded __call__


@pytest.fixture(scope="module")
def tiny():
    """(model, both objectives on from step 0, student params with heads, a perturbed teacher,
    a batch of 8 images with 2 local views each)."""
    model = TINY
    sd = distillation.SelfDistillation(
        check_options("self_distillation", dict(HEAD, n_local=2, local_size=8)), 32, 0, 0.9)
    mp = masked.MaskedPrediction(check_options("masked_prediction", HEAD), 32, 0, 0.9, patch=(8, 8))

    def shapes(rng):
        params = model.init(rng, jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 6), jnp.int32))
        return {**params["params"], **sd.init_params(rng), **mp.init_params(rng)}

    # Random values of the params' shapes (numpy: a jitted init costs seconds of compiling).
    rng = np.random.default_rng(1)
    abstract = jax.eval_shape(shapes, jax.random.key(0))
    params = jax.tree_util.tree_map(
        lambda x: rng.normal(0, 0.3, x.shape).astype(np.float32), abstract)
    teacher = {k: jax.tree_util.tree_map(
        lambda x: x + rng.normal(0, 0.05, x.shape).astype(np.float32), params[k])
        for k in ("img", "distill_head", "masked_head")}
    rng = np.random.default_rng(0)
    batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
             "labels": rng.integers(2, 32, (8, 6)).astype(np.int32),
             "local_views": rng.uniform(-1, 1, (8, 2, 8, 8, 3)).astype(np.float32)}
    return model, sd, mp, params, teacher, batch


def _call(objective, model, params, teacher, batch, rng):
    """The objective's loss metric, through `__call__` as `step.make_train_step` calls it."""
    inputs = ObjectiveInputs(model, params, batch, None, None, {}, jnp.int32(5), teacher, rng)
    metrics = objective(inputs)[1]
    (loss,) = metrics.values()
    return loss


@functools.partial(jax.jit, static_argnums=0)
def _reference_scores(which, params, teacher, batch, mask_rng):
    """(student scores, teacher scores, mask) of the tiny batch, computed as the objectives
    describe, outside them: the student's local views [8, 2, K] and the teacher's image
    [8, K]; or the student's masked image and the teacher's image at every patch [8, 4, K]
    with the mask [8, 4] the objective draws from `mask_rng`."""
    head = selfsup.ProjectionHead(HEAD["head_hidden"], HEAD["head_bottleneck"], K,
                                  HEAD["head_layers"])
    features = lambda p, x, **kw: TINY.apply({"params": p}, x, **kw,
                                              method=Model.image_features)
    both = {**params, **teacher}
    if which == "self_distillation":
        fs, _ = features(params, batch["local_views"].reshape(16, 8, 8, 3))
        ft, _ = features(both, batch["image"])
        mask = jnp.zeros((8, 4), bool)
        name = "distill_head"
    else:
        mask, _ = masked.random_mask(mask_rng, 8, 4, 0.5)
        _, fs = features(params, batch["image"], patch_mask=mask,
                         mask_token=params["mask_token"])
        _, ft = features(both, batch["image"])
        name = "masked_head"
    student = head.apply({"params": params[name]}, fs).reshape(8, -1, K)
    return student, head.apply({"params": teacher[name]}, ft), mask


@pytest.mark.parametrize("which", ["self_distillation", "masked_prediction"])
def test_sharded_call_normalises_over_the_global_batch(tiny, which):
    model, sd, mp, params, teacher, batch = tiny
    objective = sd if which == "self_distillation" else mp
    mesh = make_mesh([("data", -1)])
    assert mesh.devices.size == 8
    rng = jax.random.key(7)
    call = jax.jit(lambda p, t, b: _call(objective, model, p, t, b, rng))
    replicated = NamedSharding(mesh, P())
    sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
    assert len(sharded["image"].sharding.device_set) == 8
    got_8 = float(call(jax.device_put(params, replicated), jax.device_put(teacher, replicated),
                       sharded))
    one = jax.devices()[0]
    got_1 = float(call(*jax.device_put((params, teacher, batch), one)))
    np.testing.assert_allclose(got_8, got_1, rtol=1e-6)

    # DINOv2's loss from head scores computed outside the objective, on the global batch.
    student, teacher_s, mask = (np.asarray(x) for x in _reference_scores(
        which, params, teacher, batch, jax.random.fold_in(rng, masked.SALT)))
    if which == "self_distillation":
        reference = lambda rows: _dino_loss(teacher_s[rows], student[rows], "sinkhorn")
    else:
        reference = lambda rows: _ibot_loss(teacher_s[rows], student[rows], mask[rows],
                                            "sinkhorn")
    want = reference(slice(None))
    np.testing.assert_allclose(got_8, want, rtol=1e-5)
    # Sinkhorn-Knopp over each device's rows alone would give another loss.
    per_device = np.mean([reference(slice(i, i + 1)) for i in range(8)])
    assert abs(per_device - want) > 1e-2 * abs(want)
