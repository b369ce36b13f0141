"""The row ops on DTensors (fastnorm/ops/sharding.py): tensor and sequence parallelism on gloo, 2
CPU processes, with the CPU fast path off in the ranks (so the fastnorm:: ops are called, as on
GPUs, and torch.layer_norm / torch.rms_norm are made to raise there to prove it).

The multiprocess checks run in ONE spawn of 2 processes for the whole module (a module-scoped
fixture, as tests/test_sync_batchnorm.py); each rank runs every check in CHECKS and writes its
verdicts to a JSON file, and one test per check reads them.

Tolerances: the row ops themselves compute each row as the unsharded op does (forward outputs and
dx are compared at float64 tolerance); what is not bitwise is the order of sums: dweight / dbias
are per-rank sums over the local rows, added by DTensor's all-reduce, and in the models the
tensor-parallel Linear layers sum their partial products across ranks (reduce-scatter /
all-reduce), so the models are compared at float32 tolerances.
"""
from __future__ import annotations

import contextlib
import copy
import faulthandler
import inspect
import json
import sys

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fastnorm
import fastnorm.functional as FN
import gloo_ranks

WORLD = 2
SPAWN_TIMEOUT_S = 300  # generous for a loaded CI machine; a hung collective is what waits this long
COLLECTIVE_TIMEOUT_S = 120

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="torch.distributed with the gloo backend is not available")

_fn = torch.ops.fastnorm


def _close(actual, expected, what, dtype=None):
    """assert_close at the dtype's tolerance, atol scaled by the expected magnitude."""
    dtype = dtype or expected.dtype
    rtol, atol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 2e-5)
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale,
                               msg=lambda m: f"{what}\n{m}")


class _Soft:
    """Collects assertion failures and raises them together at the end of a check, so that a
    mismatch on one rank does not skip the collectives the other rank is waiting in."""

    def __init__(self):
        self.errors = []

    def __call__(self, fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except AssertionError as e:
            self.errors.append(str(e))

    def close(self, *args, **kwargs):
        self(_close, *args, **kwargs)

    def true(self, cond, msg):
        if not cond:
            self.errors.append(msg)

    def done(self):
        if self.errors:
            raise AssertionError(f"{len(self.errors)} mismatches:\n" + "\n".join(self.errors[:8]))


@contextlib.contextmanager
def _op_path_only():
    """torch.layer_norm / torch.rms_norm raise: the fast path (and any ATen fallback) would call
    them, the fastnorm:: ops do not."""
    saved = torch.layer_norm, torch.rms_norm

    def refuse(*args, **kwargs):
        raise AssertionError("an ATen norm was called: the fastnorm:: op path was not taken")

    torch.layer_norm = torch.rms_norm = refuse
    try:
        yield
    finally:
        torch.layer_norm, torch.rms_norm = saved


def _mesh1d():
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cpu", (WORLD,))


def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


# ==============================================================================================
# the checks (every rank runs every one)
# ==============================================================================================
def _check_registered(rank):
    from fastnorm.ops import sharding
    from torch.distributed.tensor import DTensor
    funcs = DTensor._op_dispatcher.sharding_propagator.op_strategy_funcs
    missing = [n for n in sharding.ROW_OPS if getattr(_fn, n).default not in funcs]
    assert not missing, f"no sharding strategy for {missing}"
    assert not FN._cpu_fast_path_enabled, "the CPU fast path must be off in the ranks"


def _check_stats_placement_is_dtensors_flatten(rank):
    """The statistics' placement is the one DTensor's own view rule gives the rows flattened to
    [M] (so DTensor can redistribute them), and where that rule refuses (a non-last row dim the
    mesh does not divide) the op runs on Replicate."""
    from fastnorm.ops.sharding import row_placements
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _mesh1d()
    soft = _Soft()
    for rows in [(4,), (3,), (4, 6), (4, 5), (3, 6), (2, 3, 4), (2, 4, 3), (3, 4, 2)]:
        for d in range(len(rows)):
            t = distribute_tensor(torch.arange(float(torch.Size(rows).numel())).reshape(rows),
                                  mesh, [Shard(d)])
            act, stats = row_placements(t.placements, rows, (WORLD,))
            try:
                flat = t.flatten()
            except RuntimeError:  # DTensor refuses: the op must not keep the shard
                soft.true(act == (Replicate(),), f"rows {rows} Shard({d}): kept {act}")
                continue
            soft.true(act == (Shard(d),), f"rows {rows} Shard({d}): demoted to {act}")
            soft.true(tuple(flat.placements) == stats,
                      f"rows {rows} Shard({d}): stats {stats}, DTensor's flatten "
                      f"{tuple(flat.placements)}")
    # normalised dims, Partial and Replicate inputs are replicated
    from torch.distributed.tensor import Partial
    for p in (Shard(2), Shard(3), Partial(), Replicate()):
        soft.true(row_placements((p,), (4, 6), (WORLD,))[0] == (Replicate(),), f"{p} kept")
    # a 2-D mesh: the split factor counts the rows the earlier mesh dim leaves
    act, stats = row_placements((Shard(0), Shard(1)), (4, 6), (2, 3))
    soft.true(stats[0] == Shard(0) and stats[1].split_factor == 2, f"2-D mesh stats {stats}")
    soft.done()


def _row_op_cases():
    """Input shapes: 3-D even and uneven over 2 ranks, and a 2-D one (uneven rows)."""
    return [(4, 6, 8), (3, 5, 8), (5, 8)]


def _check_row_ops_on_dtensors(rank):
    """Every row op, forward and backward, on a 3-D input sharded on dim 0, dim 1 (row dims: no
    communication, stats Shard(0) / _StridedShard) and dim 2 (normalised: replicated first),
    against the op on the whole tensors; dweight / dbias come out Partial("sum"). Uneven: a
    row dim the mesh does not divide stays sharded when it is the last row dim (5 rows of
    (3, 5, 8), (5, 8)), else it is replicated first (3 of (3, 5, 8)). Each backward runs with
    several output masks on the same DTensors (the masks are in the sharding cache key)."""
    from torch.distributed.tensor import (DTensor, Partial, Replicate, Shard,
                                          distribute_tensor)
    mesh = _mesh1d()
    soft = _Soft()
    dt = torch.float64
    gen = torch.Generator().manual_seed(7)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dt)

    for shape in _row_op_cases():
        d = shape[-1]
        x, res, g, g2 = rnd(*shape), rnd(*shape), rnd(*shape), rnd(*shape)
        w, b = rnd(d) + 1, rnd(d)
        ns = [d]
        last_row = len(shape) - 2
        for sd in range(len(shape)):
            def dist_(t, p=Shard(sd)):
                return distribute_tensor(t, mesh, [p])

            X, R, G, G2 = dist_(x), dist_(res), dist_(g), dist_(g2)
            W, B = dist_(w, Replicate()), dist_(b, Replicate())
            kept_shard = sd <= last_row and (shape[sd] % WORLD == 0 or sd == last_row)
            kept = (Shard(sd),) if kept_shard else (Replicate(),)
            grad_p = (Partial("sum"),) if kept_shard else (Replicate(),)
            tag = f"{shape} Shard({sd})"

            def compare(name, outs, refs, roles):
                for i, (o, r, role) in enumerate(zip(outs, refs, roles)):
                    soft.true(isinstance(o, DTensor), f"{tag} {name}[{i}] is not a DTensor")
                    if not isinstance(o, DTensor):
                        continue
                    if role == "act" and r.numel():
                        soft.true(tuple(o.placements) == kept, f"{tag} {name}[{i}] {o.placements}")
                    if role == "grad" and r.numel():
                        soft.true(tuple(o.placements) == grad_p,
                                  f"{tag} {name}[{i}] {o.placements}, expected {grad_p}")
                    soft.close(o.full_tensor(), r, f"{tag} {name}[{i}]")

            # LayerNorm
            ref = _fn.layer_norm_fwd(x, ns, w, b, 1e-5)
            out = _fn.layer_norm_fwd(X, ns, W, B, 1e-5)
            compare("layer_norm_fwd", out, ref, ("act", "stat", "stat"))
            if kept_shard and out[1].numel():
                want = Shard(0) if sd == 0 else "_StridedShard"
                got = out[1].placements[0]
                soft.true(got == want if sd == 0 else type(got).__name__ == want,
                          f"{tag} mean placed {got}")
            for mask in ([True, True, True], [True, False, True], [False, True, False]):
                refb = _fn.layer_norm_bwd(g, x, ref[1], ref[2], w, ns, mask, b)
                outb = _fn.layer_norm_bwd(G, X, out[1], out[2], W, ns, mask, B)
                compare(f"layer_norm_bwd{mask}", outb, refb, ("act", "grad", "grad"))
            # RMSNorm
            ref = _fn.rms_norm_fwd(x, ns, w, 1e-6)
            out = _fn.rms_norm_fwd(X, ns, W, 1e-6)
            compare("rms_norm_fwd", out, ref, ("act", "stat"))
            for mask in ([True, True], [True, False]):
                refb = _fn.rms_norm_bwd(g, x, ref[1], w, ns, mask)
                outb = _fn.rms_norm_bwd(G, X, out[1], W, ns, mask)
                compare(f"rms_norm_bwd{mask}", outb, refb, ("act", "grad"))
            # gated RMSNorm (groups of the last dim, group-major rstd), where this build has it
            if hasattr(_fn, "gated_rms_norm_fwd") and d % 4 == 0:
                gate = rnd(*shape)
                Gate = dist_(gate)
                for before, act in ((True, 4), (False, 10)):
                    args = (d // 2, before, act)
                    ref = _fn.gated_rms_norm_fwd(x, gate, w, 1e-6, *args, False)
                    out = _fn.gated_rms_norm_fwd(X, Gate, W, 1e-6, *args, False)
                    compare(f"gated_rms_norm_fwd{args}", out, ref, ("act", "stat"))
                    for mask in ([True, True, True], [False, True, False]):
                        refb = _fn.gated_rms_norm_bwd(g, x, gate, ref[1], w, *args, mask)
                        outb = _fn.gated_rms_norm_bwd(G, X, Gate, out[1], W, *args, mask)
                        compare(f"gated_rms_norm_bwd{args}{mask}", outb, refb,
                                ("act", "act", "grad"))
            # add_norm, LayerNorm and RMSNorm, with and without a residual-stream gradient
            for rms in (False, True):
                bias, B_ = (None, None) if rms else (b, B)
                ref = _fn.add_norm_fwd(x, res, ns, w, bias, 1e-5, rms)
                out = _fn.add_norm_fwd(X, R, ns, W, B_, 1e-5, rms)
                compare(f"add_norm_fwd rms={rms}", out, ref, ("act", "act", "stat", "stat"))
                for gro, GRO in ((None, None), (g2, G2)):
                    mask = [True, True, True, not rms]
                    refb = _fn.add_norm_bwd(g, gro, ref[1], ref[2], ref[3], w, ns, rms, dt, mask)
                    outb = _fn.add_norm_bwd(G, GRO, out[1], out[2], out[3], W, ns, rms, dt, mask)
                    compare(f"add_norm_bwd rms={rms} grad_residual_out={gro is not None}",
                            outb, refb, ("act", "act", "grad", "grad"))
    soft.done()


def _check_functional_autograd_on_dtensors(rank):
    """fastnorm.functional (autograd through the ops) on DTensors sharded on the sequence dim:
    outputs and the gradients of input, residual (gate), weight and bias."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    mesh = _mesh1d()
    soft = _Soft()
    gen = torch.Generator().manual_seed(3)
    shape = (2, 6, 8)
    x, res, g, g2 = (torch.randn(shape, generator=gen) for _ in range(4))
    w, b = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen)

    def run(dist_):
        xs = [dist_(t, Shard(1)).requires_grad_() for t in (x, res)]
        ps = [dist_(t, Replicate()).requires_grad_() for t in (w, b)]
        gs = [dist_(t, Shard(1)) for t in (g, g2)]
        ys = [FN.layer_norm(xs[0], (8,), ps[0], ps[1]), FN.rms_norm(xs[0], [8], ps[0])]
        ys += list(FN.add_layer_norm(xs[0], xs[1], 8, ps[0], ps[1]))
        ys += list(FN.add_rms_norm(xs[0], xs[1], 8, ps[0]))
        # one output of each fused add + norm reaching the loss: the other's gradient is None, not
        # a plain zeros tensor mixed with DTensors
        ys.append(FN.add_rms_norm(xs[0], xs[1], 8, ps[0])[0])
        ys.append(FN.add_layer_norm(xs[0], xs[1], 8, ps[0], ps[1])[1])
        if "weight_offset" in inspect.signature(FN.rms_norm).parameters:  # the op's newer args
            ys.append(FN.rms_norm(xs[0], [8], ps[0], weight_offset=1.0,
                                  normalized_dtype=torch.float32))
        if hasattr(FN, "gated_rms_norm"):  # groups of the last dim, gate sharded like input
            ys.append(FN.gated_rms_norm(xs[0], xs[1], ps[0], group_size=4))
            ys.append(FN.gated_rms_norm(xs[0], xs[1], ps[0], group_size=4,
                                        norm_before_gate=False, activation="sigmoid"))
        loss = sum((y * gs[i % 2]).sum() for i, y in enumerate(ys))
        loss.backward()
        return [_full(y).detach() for y in ys] + [_full(t.grad) for t in xs + ps]

    with _op_path_only():
        got = run(lambda t, p: distribute_tensor(t, mesh, [p]))
    want = run(lambda t, p: t.clone())
    for i, (a, e) in enumerate(zip(got, want)):
        soft.close(a, e, f"functional output/grad {i}")
    soft.done()


class AddNorm(nn.Module):
    """The fused residual add + norm as a layer: (norm(x + residual), x + residual)."""

    def __init__(self, d, rms):
        super().__init__()
        self.d, self.rms = d, rms
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = None if rms else nn.Parameter(torch.zeros(d))

    def forward(self, x, residual):
        if self.rms:
            return FN.add_rms_norm(x, residual, self.d, self.weight, 1e-6)
        return FN.add_layer_norm(x, residual, self.d, self.weight, self.bias, 1e-5)


class Block(nn.Module):
    """A transformer-ish block: input projection, norm, MLP, fused residual add + norm, output
    projection (torch.nn norms: fastnorm.convert() swaps them)."""

    def __init__(self, d=16, hidden=32, rms=False):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.norm = nn.RMSNorm(d, eps=1e-6) if rms else nn.LayerNorm(d)
        self.w1 = nn.Linear(d, hidden)
        self.w2 = nn.Linear(hidden, d)
        self.add_norm = AddNorm(d, rms)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        h = self.embed(x)
        f = self.w2(torch.relu(self.w1(self.norm(h))))
        o, r = self.add_norm(f, h)
        return self.out(o), r


def _sp_plan():
    """TorchTitan's Llama plan, in small: the residual stream sharded on the sequence dim
    (Shard(1)) between the tensor-parallel Linear layers, the norms under SequenceParallel."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel)

    class SequenceParallelInputs(SequenceParallel):
        """SequenceParallel for a layer of several sequence-sharded inputs (the stock style
        prepares the first input only)."""

        @staticmethod
        def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
            return tuple(SequenceParallel._prepare_input_fn(sequence_sharding, mod, (t,),
                                                            device_mesh) for t in inputs)

    return {
        "embed": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "w1": ColwiseParallel(input_layouts=Shard(1)),
        "w2": RowwiseParallel(output_layouts=Shard(1)),
        "add_norm": SequenceParallelInputs(),
        "out": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }


def _model(rms, seed=11):
    torch.manual_seed(seed)
    m = Block(rms=rms)
    with torch.no_grad():  # norm parameters away from ones / zeros, so their gradients matter
        for name, p in m.named_parameters():
            if name.startswith(("norm.", "add_norm.")):
                p.add_(torch.randn_like(p) * 0.3)
    fastnorm.convert(m)
    assert isinstance(m.norm, (fastnorm.LayerNorm, fastnorm.RMSNorm)), type(m.norm)
    return m


def _train_step(model, x, g1, g2):
    out, r = model(x)
    loss = (_full(out) * g1).sum() + (_full(r) * g2).sum()
    loss.backward()
    return _full(out).detach(), _full(r).detach()


def _compare_models(soft, tag, par, ref, outs, ref_outs):
    for name, a, e in zip(("output", "residual_out"), outs, ref_outs):
        soft.close(a, e, f"{tag} {name}", torch.float32)
    ref_grads = dict(ref.named_parameters())
    names = [n for n, _ in par.named_parameters()]
    soft.true(sorted(names) == sorted(ref_grads), f"{tag} parameters {names}")
    for n, p in par.named_parameters():
        soft.true(p.grad is not None, f"{tag} {n} has no grad")
        if p.grad is not None:
            soft.close(_full(p.grad), ref_grads[n].grad, f"{tag} grad of {n}", torch.float32)


def _data(seed=5, shape=(2, 6, 16)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(3)]


def _check_sequence_parallel_block(rank):
    """The block under parallelize_module (SequenceParallel norms, Colwise/Rowwise Linear), one
    forward + backward, against the same model in this process without parallelism: outputs and
    every parameter gradient (norm weights / biases: Partial sums over each rank's rows), and the
    parameters after an SGD step. Then once more with the CPU fast path on (ATen's norms, with
    torch's own DTensor rules)."""
    from torch.distributed.tensor import Partial
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = _mesh1d()
    soft = _Soft()
    x, g1, g2 = _data()
    for rms, fast in ((False, False), (True, False), (False, True), (True, True)):
        tag = f"{'RMSNorm' if rms else 'LayerNorm'}{' (CPU fast path)' if fast else ''}"
        ref = _model(rms)
        par = copy.deepcopy(ref)
        parallelize_module(par, mesh, _sp_plan())
        was = FN.set_cpu_fast_path(fast)
        try:
            with contextlib.nullcontext() if fast else _op_path_only():
                outs = _train_step(par, x, g1, g2)
        finally:
            FN.set_cpu_fast_path(was)
        ref_outs = _train_step(ref, x, g1, g2)
        _compare_models(soft, tag, par, ref, outs, ref_outs)
        for n in ("norm.weight", "add_norm.weight"):
            grad = dict(par.named_parameters())[n].grad
            soft.true(tuple(grad.placements) == (Partial("sum"),),
                      f"{tag} {n}.grad placed {grad.placements}")
        # an optimizer step on the Replicate parameters sums the Partial gradients
        for m in (par, ref):
            torch.optim.SGD(m.parameters(), lr=0.1).step()
        want = dict(ref.named_parameters())
        for n, p in par.named_parameters():
            soft.close(_full(p).detach(), want[n].detach(), f"{tag} {n} after a step",
                       torch.float32)
    soft.done()


def _check_fsdp2_with_tensor_parallel(rank):
    """fully_shard (FSDP2) on the data-parallel dim of a 2-D mesh, dp=1 x tp=2, with the
    sequence-parallel plan on tp: two optimizer steps against the unparallel model's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("dp", "tp"))
    soft = _Soft()
    for rms in (False, True):
        tag = f"FSDP2+TP {'RMSNorm' if rms else 'LayerNorm'}"
        ref = _model(rms)
        par = copy.deepcopy(ref)
        parallelize_module(par, mesh["tp"], _sp_plan())
        fully_shard(par, mesh=mesh["dp"])
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (par, ref)]
        for step in range(2):
            x, g1, g2 = _data(seed=20 + step)
            with _op_path_only():
                outs = _train_step(par, x, g1, g2)
            ref_outs = _train_step(ref, x, g1, g2)
            _compare_models(soft, f"{tag} step {step}", par, ref, outs, ref_outs)
            for o in opts:
                o.step()
                o.zero_grad()
    soft.done()


CHECKS = {name[len("_check_"):]: fn for name, fn in sorted(globals().items())
          if name.startswith("_check_") and callable(fn)}


# ==============================================================================================
# the spawn
# ==============================================================================================
def _worker(rank, port, outdir):
    # a hang (a collective the other rank never joins) dumps every thread's stack and exits
    # before the fixture gives up, so the failure says where
    faulthandler.dump_traceback_later(SPAWN_TIMEOUT_S - 60, exit=True)
    FN.set_cpu_fast_path(False)  # the ops as on GPUs
    gloo_ranks.run_checks(rank, port, outdir, CHECKS, WORLD, COLLECTIVE_TIMEOUT_S)


def _spawn(outdir):
    """Runs the ranks; returns (per-rank results, error or None)."""
    return gloo_ranks.spawn(_worker, WORLD, SPAWN_TIMEOUT_S, outdir)


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory, request):
    if not hasattr(request.config, "workerinput"):  # no pytest-xdist: this process spawns
        return _spawn(str(tmp_path_factory.mktemp("tensor_parallel")))
    # Under pytest-xdist (make test) the checks' tests are spread over the workers: the first
    # worker to get here spawns the ranks, the others wait for its results (one spawn per
    # session; the session's base temp dir is shared by its workers).
    try:
        from filelock import FileLock  # a dependency of torch
    except ImportError:
        return _spawn(str(tmp_path_factory.mktemp("tensor_parallel")))
    shared = tmp_path_factory.getbasetemp().parent / "tensor_parallel"
    with FileLock(str(shared) + ".lock"):
        done = shared / "results.json"
        if not done.exists():
            shared.mkdir(exist_ok=True)
            done.write_text(json.dumps(_spawn(str(shared))))
        results, error = json.loads(done.read_text())
    return results, error


@pytest.mark.parametrize("check", list(CHECKS))
def test_gloo(gloo_results, check):
    gloo_ranks.assert_check(*gloo_results, check)


# ==============================================================================================
# single process
# ==============================================================================================
@pytest.mark.parametrize("dtensor_first", [False, True])
def test_registered_at_import_of_either(dtensor_first):
    """Importing fastnorm leaves torch.distributed.tensor alone (its import costs ~0.6 s): the
    rules are registered when it is imported (a one-shot import hook), or at once when it was
    imported before fastnorm."""
    import subprocess
    check = ("from fastnorm.ops import sharding; assert all(sharding._registered.values()), "
             "sharding._registered; assert sharding._hook is None; import torch; "
             "print(torch.distributed.tensor.DTensor._op_dispatcher.sharding_propagator"
             ".op_strategy_funcs[torch.ops.fastnorm.rms_norm_fwd.default])")
    if dtensor_first:
        code = "import torch.distributed.tensor, fastnorm; " + check
    else:
        code = ("import sys, fastnorm; assert 'torch.distributed.tensor' not in sys.modules; "
                "from fastnorm.ops import sharding; assert not any(sharding._registered.values()); "
                "import torch.distributed.tensor; " + check)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_row_op_strategy" in proc.stdout


def test_register_is_idempotent_and_covers_every_row_op():
    from fastnorm.ops import row_norms, sharding
    assert sharding.register()
    assert sharding.register()
    missing = set(row_norms.SCHEMAS) - set(sharding.ROW_OPS)
    assert not missing, f"row ops without a sharding rule: {missing}"
    for name, rule in sharding.ROW_OPS.items():
        if name not in row_norms.SCHEMAS:  # a rule ahead of its op: skipped by register()
            continue
        schema = getattr(_fn, name).default._schema
        args = {a.name for a in schema.arguments}
        named = [rule.rows, *rule.acts, *rule.stats]
        named += [n for n in (rule.normalized, rule.stat_groups) if isinstance(n, str)]
        for arg in named:
            assert arg in args, f"{name}: {arg} is not in its schema"
        if rule.mask:
            assert rule.mask in args
        assert len(rule.outputs) == len(schema.returns), name
