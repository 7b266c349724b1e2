"""Training (README "Training"): Newton-Schulz, Parallel Muon against a plain single-process reference (one process
and two gloo processes), the complementary-loss bigram counts, late QAT, warm-up restore, the LR and
momentum schedules, EMA/SWA and the wall-clock budget of a real run."""
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import ROOT, run_script, tiny_hp
import train_gpt as tg

NS = (3.4445, -4.7750, 2.0315)  # README "Training" quintic coefficients


# -----------------------------------------------------------------------------------------------------
# Newton-Schulz
# -----------------------------------------------------------------------------------------------------

def well_conditioned(rows, cols, seed):
    """U diag(s) V^T with singular values spread over [0.1, 1] (condition number 10)."""
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return U @ torch.diag(torch.linspace(1.0, 0.1, k)) @ V.T


@pytest.mark.parametrize("shape", [(64, 64), (128, 32), (32, 128)])
def test_newton_schulz_singular_values_and_polar_factor(shape):
    """Five quintic steps map every singular value into a band around 1. In exact arithmetic, after the
    Frobenius normalization (here sigma/||G||_F >= 0.02), the iteration p(x) = 3.4445x - 4.775x^3 + 2.0315x^5
    applied 5 times sends [0.005, 1] into [0.682, 1.154] (computed on a fine grid); bf16 rounding
    (8-bit mantissa, ~0.4% per operation) widens that by a few percent, so [0.6, 1.25] is the band with
    margin. The output is then close to the polar factor U V^T: with the same singular vectors,
    ||O - UV^T||_F / ||UV^T||_F = rms(s_i - 1) <= max|s_i - 1| ~ 0.32 in the worst case and ~0.2 for a
    spread spectrum (measured 0.19-0.22); we require < 0.3."""
    for seed in range(3):
        G = well_conditioned(*shape, seed) * (10.0 ** (seed - 1))  # the scale of G must not matter
        O = tg.zeropower_via_newtonschulz5(G, 5)
        assert O.shape == G.shape and O.dtype == torch.bfloat16
        O = O.float()
        s = torch.linalg.svdvals(O)
        assert float(s.min()) >= 0.6 and float(s.max()) <= 1.25, (float(s.min()), float(s.max()))
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        P = U @ Vh
        assert float((O - P).norm() / P.norm()) < 0.3
    # a Gaussian random rectangular matrix (well conditioned in practice) behaves the same
    G = torch.randn(shape[0] * 2, shape[1], generator=torch.Generator().manual_seed(7))
    s = torch.linalg.svdvals(tg.zeropower_via_newtonschulz5(G, 5).float())
    assert float(s.min()) >= 0.6 and float(s.max()) <= 1.25


def test_newton_schulz_batched_equals_per_matrix():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 64, 64), (3, 128, 32), (3, 32, 128)]:
        G = torch.randn(shape, generator=g)
        G[1] *= 100.0  # per-matrix normalization, not one norm for the batch
        batched = tg.zeropower_via_newtonschulz5(G, 5).float()
        for i in range(shape[0]):
            single = tg.zeropower_via_newtonschulz5(G[i], 5).float()
            assert torch.allclose(batched[i], single, atol=1e-2, rtol=0), float((batched[i] - single).abs().max())


# -----------------------------------------------------------------------------------------------------
# Parallel Muon vs a plain reference
# -----------------------------------------------------------------------------------------------------

def ns5_ref(G, steps=5):
    """Plain Newton-Schulz on one matrix, in bf16, as README "Training" describes it."""
    a, b, c = NS
    X = G.bfloat16()
    X = X / (X.norm() + 1e-7)
    tall = X.size(0) > X.size(1)
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X  # Muon reference code (c * A) @ A
    return (X.T if tall else X).float()


def muon_step_ref(W, buf, g, mu, lr, wd):
    """One plain Muon step on one matrix (g already clipped): (new W, new momentum buffer)."""
    buf = mu * buf + g
    R, C = g.shape
    return W * (1 - lr * wd) - lr * ns5_ref(g + mu * buf) * math.sqrt(max(1.0, R / C)), buf


def ref_muon(init, grads_per_step, clips, hp, momenta, lr_mults):
    """Single-process Muon, one matrix at a time: b = mu*b + clip*g; update = NS5(clip*g + mu*b) *
    sqrt(max(1, rows/cols)); p = p*(1 - lr*wd) - lr*update, lr = lr_mult * (MATRIX_LR_ENCODER for layers
    < L//2 else MATRIX_LR_DECODER); rows i and L+i of the q/o and k/v banks belong to layer i."""
    L = hp.num_layers
    P = {n: t.clone().float() for n, t in init.items()}
    buf = {n: torch.zeros_like(t) for n, t in P.items()}
    history = []
    for grads, clip, mu, lr_mult in zip(grads_per_step, clips, momenta, lr_mults):
        for name in tg.BANKS:
            for i in range(P[name].size(0)):
                layer = i % L
                lr = lr_mult * (hp.matrix_lr_encoder if layer < L // 2 else hp.matrix_lr_decoder)
                P[name][i], buf[name][i] = muon_step_ref(P[name][i], buf[name][i], grads[name][i] * clip, mu, lr,
                                                         hp.muon_wd)
        history.append({n: t.clone() for n, t in P.items()})
    return history


def assert_banks_close(got, ref, prev, what, tol=0.05):
    """Per matrix: ||got - ref||_F < 5% of the reference's own change ||ref - prev||_F. Newton-Schulz runs
    in bf16, where an ulp-level change of its input (e.g. the order of the gradient average) moves the
    output by ~2% (Frobenius); a 2x learning rate, a swapped encoder/decoder LR or plain instead of
    Nesterov momentum move it by 30-100%."""
    for name in tg.BANKS:
        for i in range(ref[name].size(0)):
            change = float((ref[name][i] - prev[name][i]).norm())
            diff = float((got[name][i] - ref[name][i]).norm())
            assert change > 0
            assert diff <= tol * change, f"{what}: {name}[{i}] differs by {diff:.3e} (change {change:.3e})"


def assert_weight_decay_step(after, before, hp, what):
    """A step with zero gradients is pure decoupled weight decay: p <- p * (1 - lr * wd), with the
    per-matrix LR (encoder rows / decoder rows; rows i and L+i of q/o and k/v are layer i)."""
    L = hp.num_layers
    for name in tg.BANKS:
        for i in range(before[name].size(0)):
            lr = hp.matrix_lr_encoder if i % L < L // 2 else hp.matrix_lr_decoder
            expected = before[name][i] * (1 - lr * hp.muon_wd)
            assert torch.allclose(after[name][i], expected, rtol=1e-6, atol=0), f"{what}: {name}[{i}]"
            assert not torch.equal(after[name][i], before[name][i])


def perturbed_model(hp, seed=1234):
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero-initialized banks become non-zero, so weight decay is visible
        for name in tg.BANKS:
            p = getattr(model, name)
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def test_parallel_muon_single_process_matches_reference():
    """Three steps of ParallelMuon (world 1): zero gradients (weight decay only), then two random ones with
    the schedule's momentum / LR multiplier / clip changing, against the plain per-matrix reference."""
    hp = tiny_hp(embed_proj_muon=False)  # the banks alone (the projections: test_embed_proj_muon_*)
    model = perturbed_model(hp)
    muon, _, _ = tg.build_optimizers(model, hp, tg.Dist())
    init = {n: getattr(model, n).detach().clone() for n in tg.BANKS}
    g = torch.Generator().manual_seed(5)
    grads_per_step, after = [], []
    momenta, lr_mults, clips = (hp.muon_momentum_warmup_start,) * 2 + (0.95,), (1.0, 1.0, 0.5), (1.0, 1.0, 0.7)
    for step in range(3):
        grads = {}
        for name in tg.BANKS:
            p = getattr(model, name)
            p.grad = torch.randn(p.shape, generator=g) if step > 0 else torch.zeros(p.shape)
            grads[name] = p.grad.clone()
        grads_per_step.append(grads)
        for group in muon.param_groups:  # what Trainer.step sets from the schedule
            group["momentum"], group["lr_mult"] = momenta[step], lr_mults[step]
        muon.launch_reduce_scatter()
        shard = muon.wait_reduce_scatter()
        muon.step(shard, torch.tensor(clips[step]))
        model.zero_grad(set_to_none=True)
        after.append({n: getattr(model, n).detach().clone() for n in tg.BANKS})
    assert_weight_decay_step(after[0], init, hp, "zero-gradient step")
    ref = ref_muon(init, grads_per_step, clips, hp, momenta, lr_mults)
    assert_banks_close(after[1], ref[1], ref[0], "step 1")
    assert_banks_close(after[2], ref[2], ref[1], "step 2")
    lrs = muon.param_groups[0]["lrs"]
    L = hp.num_layers
    assert lrs.tolist() == pytest.approx([hp.matrix_lr_encoder if i % L < L // 2 else hp.matrix_lr_decoder
                                          for i in range(2 * L)])


def test_embed_proj_muon_moves_the_projections_into_muon():
    """EMBED_PROJ_MUON=1 (PR #850): the BigramHash and VE projections leave AdamW and take two Muon steps at
    MATRIX_LR_ENCODER, equal to the plain per-matrix reference; off, they stay in AdamW."""
    hp = tiny_hp(embed_proj_muon=True, embed_proj_init="orthogonal")
    model = perturbed_model(hp)
    muon, adam, replicated = tg.build_optimizers(model, hp, tg.Dist())
    projs = [model.get_parameter(n) for n in tg.PROJ_NAMES]
    ids = {id(p) for p in projs}
    assert not ids & {id(p) for p in replicated} and not ids & {id(p) for g in adam.param_groups for p in g["params"]}
    off, _, rep_off = tg.build_optimizers(model, tiny_hp(embed_proj_muon=False), tg.Dist())
    assert len(off.param_groups) == len(tg.BANKS) and ids <= {id(p) for p in rep_off}
    g = torch.Generator().manual_seed(7)
    W, buf, mu = [p.detach().clone() for p in projs], [torch.zeros_like(p) for p in projs], 0.95
    for step, (lr_mult, clip) in enumerate(((1.0, 1.0), (0.5, 0.6))):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        grads = [p.grad.clone() for p in projs]
        for group in muon.param_groups:
            group["momentum"], group["lr_mult"] = mu, lr_mult
        muon.launch_reduce_scatter()
        muon.step(muon.wait_reduce_scatter(), torch.tensor(clip))
        lr = hp.matrix_lr_encoder * lr_mult
        for i, gr in enumerate(grads):
            new, buf[i] = muon_step_ref(W[i], buf[i], clip * gr, mu, lr, hp.muon_wd)
            change, diff = float((new - W[i]).norm()), float((projs[i].detach() - new).norm())
            assert diff <= 0.05 * change, f"step {step}: {tg.PROJ_NAMES[i]} differs by {diff:.3e} (change {change:.3e})"
            W[i] = projs[i].detach().clone()


@pytest.fixture(scope="module", params=[2, 4])
def muon_ranks(request, tmp_path_factory):
    """(world, out): the worker's records. 4 ranks with 3 layers: rank 3 owns no row of any bank (ceil(3/4) = 1
    MLP row and ceil(6/4) = 2 q/o rows per rank), the case of ranks 6 and 7 with 11 layers on 8 GPUs."""
    world = request.param
    out = tmp_path_factory.mktemp(f"muon{world}")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
                           str(ROOT / "tests" / "_muon_worker.py"), str(out)],
                          env=env, capture_output=True, text=True, timeout=300, cwd=str(out))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return world, out


@pytest.mark.parametrize("num_layers", [4, 3])
def test_parallel_muon_gloo_ranks_match_reference(muon_ranks, num_layers):
    """Ranks with different gradients: the reduce-scatter averages them, each owner steps its shard,
    the all-gather leaves identical banks on every rank, equal to the single-process reference fed the
    average gradient. NUM_LAYERS=3: the MLP banks hold 3 matrices, not divisible by the world size; on 4 ranks
    the last rank owns zero rows (it pads, runs Newton-Schulz and norms on empty tensors)."""
    world, out = muon_ranks
    recs = [torch.load(out / f"L{num_layers}_rank{r}.pt") for r in range(world)]
    n_steps = len(recs[0]["after"])
    for name in tg.BANKS:
        for r in range(1, world):
            assert torch.equal(recs[0]["init"][name], recs[r]["init"][name])
            assert not torch.equal(recs[0]["grads"][1][name], recs[r]["grads"][1][name])
            for s in range(n_steps):
                assert torch.equal(recs[0]["after"][s][name], recs[r]["after"][s][name]), (name, r, s)
    hp = tiny_hp(num_layers=num_layers, embed_proj_muon=False)
    if num_layers == 3:
        assert recs[0]["init"]["mlp_up_bank"].size(0) == 3
    assert_weight_decay_step(recs[0]["after"][0], recs[0]["init"], hp, f"L{num_layers} zero-gradient step")
    avg = [{n: sum(rec["grads"][s][n] for rec in recs) / world for n in tg.BANKS} for s in range(n_steps)]
    # the reduce-scatter hands each rank the AVERAGE gradient of the whole matrices it owns: ceil(N / world)
    # each in rank order, so trailing ranks may own none; the owned squared norms add up to the global one
    # (gradient clip). It communicates in bf16 (issue 13): bf16 rounds to 2^-8 relative (8 significant bits), and after the division
    # by the world size each rounding (the inputs, world - 1 partial sums, the result) moves an element by at
    # most 2^-8 of the mean magnitude of its inputs.
    zero_row_ranks = set()
    for s in range(1, n_steps):
        total_sq = 0.0
        for n in tg.BANKS:
            N = avg[s][n].size(0)
            per = -(-N // world)
            owned = [rec["shard_grads"][s][n] for rec in recs]
            for r in range(world):
                assert owned[r].shape[0] == min(per, max(0, N - r * per)), (n, r)
                if owned[r].shape[0] == 0:
                    zero_row_ranks.add(r)
            scale = sum(rec["grads"][s][n].abs() for rec in recs) / world
            assert torch.all((torch.cat(owned) - avg[s][n]).abs() <= (world + 1) * 2 ** -8 * scale), n
            assert not torch.equal(torch.cat(owned), avg[s][n])  # really bf16 on the wire (not fp32)
            total_sq += float(avg[s][n].square().sum())
        assert sum(rec["owned_sq_norm"][s] for rec in recs) == pytest.approx(total_sq, rel=1e-2)
    if world == 4 and num_layers == 3:
        assert zero_row_ranks == {3}
    mu = hp.muon_momentum_warmup_start  # build_optimizers' initial momentum
    clips = (1.0, 1.0, 0.7)  # _muon_worker.CLIPS
    # the reference is fed the averaged gradient as it arrived (bf16-rounded, checked against the exact
    # average above), so what is compared here is the optimizer's arithmetic and the update all-gather
    wire = [{n: torch.cat([rec["shard_grads"][s][n] for rec in recs]) for n in tg.BANKS} for s in range(n_steps)]
    ref = ref_muon(recs[0]["init"], wire, clips, hp, (mu,) * n_steps, (1.0,) * n_steps)
    for s in (1, 2):
        assert_banks_close(recs[0]["after"][s], ref[s], ref[s - 1], f"L{num_layers} step {s}")


def test_embed_proj_muon_gloo_ranks_match_reference(muon_ranks):
    """EMBED_PROJ_MUON=1 on 2 and 4 ranks: a projection is a bank of one matrix that only rank 0 owns; every rank
    ends with the same weights, equal to the plain Muon reference fed the average gradient (bf16 wire: 5%)."""
    world, out = muon_ranks
    recs = [torch.load(out / f"proj_rank{r}.pt") for r in range(world)]
    hp = tiny_hp(num_layers=3, embed_proj_muon=True, embed_proj_init="orthogonal")
    mu, lr = hp.muon_momentum_warmup_start, hp.matrix_lr_encoder
    for n in tg.PROJ_NAMES:
        W, buf = recs[0]["init"][n].clone(), torch.zeros_like(recs[0]["init"][n])
        for s in range(2):
            assert all(torch.equal(recs[0]["after"][s][n], rec["after"][s][n]) for rec in recs), (n, s)
            g = sum(rec["grads"][s][n] for rec in recs) / world
            new, buf = muon_step_ref(W, buf, g, mu, lr, hp.muon_wd)
            diff, change = float((recs[0]["after"][s][n] - new).norm()), float((new - W).norm())
            assert diff <= 0.05 * change, f"{n} step {s}: differs by {diff:.3e} (change {change:.3e})"
            W = recs[0]["after"][s][n]


# -----------------------------------------------------------------------------------------------------
# Complementary loss: bigram counts
# -----------------------------------------------------------------------------------------------------

class DictCounter:
    def __init__(self, alpha):
        self.alpha, self.pair, self.prev = alpha, {}, {}

    def weights(self, x, y):
        out = []
        for a, b in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()):
            c, n = self.pair.get((a, b), 0), self.prev.get(a, 0)
            out.append(max(0.1, 1 - self.alpha * c / (n + 1)))
        return torch.tensor(out).view(x.shape)

    def add(self, x, y):
        for a, b in zip(x.reshape(-1).tolist(), y.reshape(-1).tolist()):
            self.pair[(a, b)] = self.pair.get((a, b), 0) + 1
            self.prev[a] = self.prev.get(a, 0) + 1


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_bigram_counter_matches_dictionary(alpha):
    """Weights of every micro-batch of a step use the counts of earlier steps only; the step's global
    micro-batches (1-D token runs) are counted once the step is done."""
    V, micro, accum = 40, 32, 3
    counter, ref = tg.BigramCounter(V, alpha, torch.device("cpu")), DictCounter(alpha)
    g = torch.Generator().manual_seed(0)
    low = 1.0
    for step in range(6):
        chunks = [torch.randint(0, 12, (micro + 1,), generator=g) for _ in range(accum)]  # few symbols: repeats
        if step in (2, 3):  # a periodic stretch: 20 -> 21 -> 20 ... makes those bigrams near-certain
            for c in chunks:
                c[::2], c[1::2] = 20, 21
        for c in chunks:
            x, y = c[:-1].view(-1, 8), c[1:].view(-1, 8)
            w = counter.weights(x, y)
            assert w.shape == x.shape
            assert torch.allclose(w, ref.weights(x, y), atol=1e-6), step
            low = min(low, float(w.min()))
            if step == 0:
                assert bool((w == 1).all())  # nothing counted yet
        counter.update(chunks)
        for c in chunks:
            ref.add(c[:-1], c[1:])
    assert low >= 0.1 - 1e-7
    if alpha == 2.0:
        assert low == pytest.approx(0.1)  # the floor max(0.1, .) is reached
    else:
        assert low < 0.6  # 1 - 0.5 * c / (n + 1) on the periodic stretch
    for (a, b), c in ref.pair.items():
        assert int(counter.pair[a * V + b]) == c
    assert int(counter.pair.sum()) == sum(ref.pair.values())
    assert counter.prev.tolist() == [ref.prev.get(a, 0) for a in range(V)]


@pytest.mark.parametrize("world", [2, 4])
def test_bigram_counts_identical_on_all_ranks_and_world_sizes(corpus, world):
    """Every rank's loader yields the same global micro-batch; counters fed from it agree on all ranks,
    equal a dictionary count of the pairs the ranks train on, and equal the single-process counts."""
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"))

    def counts_after(world, steps=5):
        accum = 8 // world
        micro = hp.train_batch_tokens // accum
        loaders = [tg.DistributedTokenLoader(hp.data_path, tg.Dist(rank=r, world_size=world))
                   for r in range(world)]
        counters = [tg.BigramCounter(hp.vocab_size, hp.complement_alpha, torch.device("cpu")) for _ in range(world)]
        ref = DictCounter(hp.complement_alpha)
        for _ in range(steps):
            seen, trained = [[] for _ in range(world)], []
            for _ in range(accum):
                batches = [ld.next_batch(micro, hp.train_seq_len) for ld in loaders]
                for r, (x, y, tokens) in enumerate(batches):
                    assert torch.equal(tokens, batches[0][2])
                    assert torch.allclose(counters[r].weights(x, y), ref.weights(x, y), atol=1e-6)
                    seen[r].append(tokens)
                    trained.append((x, y))
            for r in range(world):
                counters[r].update(seen[r])
            for x, y in trained:  # the reference also counts once the step is done
                ref.add(x, y)
        for c in counters[1:]:
            assert torch.equal(c.pair, counters[0].pair) and torch.equal(c.prev, counters[0].prev)
        nz = torch.nonzero(counters[0].pair).flatten()
        assert {(int(k) // hp.vocab_size, int(k) % hp.vocab_size): int(counters[0].pair[k]) for k in nz} == ref.pair
        assert int(counters[0].prev.sum()) == steps * hp.train_batch_tokens
        return counters[0]

    multi, single = counts_after(world), counts_after(1)
    assert torch.equal(multi.pair, single.pair) and torch.equal(multi.prev, single.prev)


def test_alpha_zero_is_plain_cross_entropy():
    hp = tiny_hp()
    torch.manual_seed(0)
    model = tg.GPT(hp)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, hp.vocab_size, (2, 32), generator=g)
    y = torch.randint(0, hp.vocab_size, (2, 32), generator=g)
    with torch.no_grad():
        loss = model(x, y, None)
        logits = model.logits(model.hidden(x)).view(-1, hp.vocab_size)
        plain = F.cross_entropy(logits, y.reshape(-1))
        ones = model(x, y, torch.ones(2, 32))
    assert torch.equal(loss, plain)
    # all-ones weights: the same per-token CE averaged by another reduction; at most ~2 float32 ulps of a
    # ~6.9 loss apart (measured 0 or 1 ulp = 4.8e-7)
    assert float(ones) == pytest.approx(float(plain), rel=2e-7, abs=0)
    # weights really weight the per-token CE
    w = torch.rand(2, 32, generator=g)
    with torch.no_grad():
        weighted = model(x, y, w)
        ce = F.cross_entropy(logits, y.reshape(-1), reduction="none")
    assert torch.allclose(weighted, (ce * w.reshape(-1)).mean(), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_train_model_passes_weights_only_when_alpha_positive(corpus, sp, alpha):
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"), complement_alpha=alpha, iterations=2)
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    muon, adam, replicated = tg.build_optimizers(model, hp, tg.Dist())
    seen = []

    def step_fn(x, y, weights, qat):
        seen.append(weights)
        return model(x, y, weights, qat)

    trainer = tg.Trainer(hp, tg.Dist(), model, step_fn, muon, adam, replicated)
    val = tg.load_validation_tokens(hp.data_path, hp.vocab_size)
    tg.train_model(trainer, val, tg.build_byte_luts(sp, hp.vocab_size), tg.RunLog(None))
    assert len(seen) == 2 * 8
    if alpha == 0:
        assert all(w is None for w in seen)
    else:
        assert all(w is not None for w in seen)
        assert bool((seen[0] == 1).all())  # no counts before the first micro-batch
        assert float(seen[-1].min()) < 1 and float(seen[-1].min()) >= 0.1


# -----------------------------------------------------------------------------------------------------
# Late QAT
# -----------------------------------------------------------------------------------------------------

def test_fake_quant_is_export_grid():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 64, generator=g) * 0.05
    W[5] = 0
    fq = tg.fake_quant_int5(W)
    assert torch.equal(fq, tg.dequantize(*tg.quantize_rtn(W, 5)))
    assert bool((fq[5] == 0).all())
    bank = torch.randn(3, 48, 64, generator=g) * torch.tensor([0.01, 0.1, 1.0]).view(3, 1, 1)
    bank[1, 7] = 0
    fqb = tg.fake_quant_int5(bank)
    assert fqb.shape == bank.shape
    for i in range(3):  # per-matrix rows: each matrix of the bank quantized on its own
        assert torch.equal(fqb[i], tg.dequantize(*tg.quantize_rtn(bank[i], 5)))
    assert bool((fqb[1, 7] == 0).all())
    assert len(torch.unique(torch.round(fqb[2] / tg.int_row_scale(bank[2], 15)))) <= 31


def test_fake_quant_straight_through_gradient():
    g = torch.Generator().manual_seed(1)
    for shape in [(32, 48), (2, 32, 48)]:
        W = (torch.randn(shape, generator=g) * 0.05).requires_grad_(True)
        G = torch.randn(shape, generator=g)
        (tg.fake_quant_int5(W) * G).sum().backward()
        assert torch.equal(W.grad, G)


def test_qat_forward_compiles_without_graph_break():
    """The QAT forward (fake-quant banks, weighted loss) compiles with fullgraph=True (a graph break, e.g.
    from .item() or a Python branch on a tensor, raises), and forward + backward match eager."""
    torch._dynamo.reset()
    hp = tiny_hp()
    model = perturbed_model(hp)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, hp.vocab_size, (2, 32), generator=g)
    y = torch.randint(0, hp.vocab_size, (2, 32), generator=g)
    w = torch.rand(2, 32, generator=g) + 0.1
    compiled = torch.compile(model, dynamic=False, fullgraph=True, backend="aot_eager")
    try:
        loss_c = compiled(x, y, w, True)
        loss_c.backward()
        grads_c = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        loss_e = model(x, y, w, True)
        loss_e.backward()
    finally:
        torch._dynamo.reset()
    assert torch.allclose(loss_c, loss_e, rtol=1e-5)
    with torch.no_grad():
        assert float(model(x, y, w, False)) != float(loss_e)  # the QAT path really is a different forward
    for n, p in model.named_parameters():
        assert torch.allclose(grads_c[n], p.grad, rtol=1e-4, atol=1e-6), n
    assert float(model.qo_bank.grad.abs().sum()) > 0


# -----------------------------------------------------------------------------------------------------
# Warm-up restore
# -----------------------------------------------------------------------------------------------------

def make_trainer(hp, calls=None):
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    muon, adam, replicated = tg.build_optimizers(model, hp, tg.Dist())

    def step_fn(x, y, weights, qat):
        if calls is not None:
            calls.append(qat)
        return model(x, y, weights, qat)

    return tg.Trainer(hp, tg.Dist(), model, step_fn, muon, adam, replicated)


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b))
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{path}[{i}]")
    else:
        assert a == b, (path, a, b)


def test_snapshot_restore_undoes_steps(corpus):
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"))
    trainer = make_trainer(hp)
    snap = trainer.snapshot()
    loader = tg.DistributedTokenLoader(hp.data_path, trainer.d)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, torch.device("cpu"))
    for i in range(3):
        trainer.step(loader, counter, 0.7, 0.95, qat=i == 2)
    assert not torch.equal(trainer.model.qo_bank, snap[0]["qo_bank"])
    assert len(trainer.muon.state) > 0 and len(trainer.adam.state) > 0
    trainer.restore(snap)
    assert_same(trainer.model.state_dict(), snap[0], "model")
    assert_same(trainer.muon.state_dict(), snap[1], "muon")
    assert_same(trainer.adam.state_dict(), snap[2], "adam")
    assert len(trainer.muon.state) == 0 and len(trainer.adam.state) == 0
    assert [g["lr"] for g in trainer.adam.param_groups] == [hp.embed_lr, hp.scalar_lr]
    assert all(g["lr_mult"] == 1.0 and g["momentum"] == hp.muon_momentum_warmup_start
               for g in trainer.muon.param_groups)


def test_warmup_steps_leave_no_trace(corpus, sp):
    """Step-based runs with WARMUP_STEPS=3 and 0 end with bit-identical weights."""
    final = {}
    for warmup in (3, 0):
        hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"), warmup_steps=warmup,
                     iterations=3, max_wallclock_seconds=0.0)
        calls = []
        trainer = make_trainer(hp, calls)
        val = tg.load_validation_tokens(hp.data_path, hp.vocab_size)
        res = tg.train_model(trainer, val, tg.build_byte_luts(sp, hp.vocab_size), tg.RunLog(None))
        assert res.steps == 3
        assert len(calls) == 8 * (3 + warmup)  # 8 micro-batches per step: the warm-up steps really ran
        if warmup:
            assert any(calls[:8 * warmup])  # ...including the late-QAT variant
        final[warmup] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert_same(final[3], final[0], "weights")


# -----------------------------------------------------------------------------------------------------
# Schedules and weight averaging
# -----------------------------------------------------------------------------------------------------

def test_lr_multiplier_wsd():
    for frac in (0.25, 0.5, 1.0):
        start = 1 - frac
        for p in (0.0, start * 0.5, start * 0.999, start):
            assert tg.lr_multiplier(p, frac) == 1.0
        assert tg.lr_multiplier(1.0, frac) == pytest.approx(0.0, abs=1e-12)
        assert tg.lr_multiplier(1.5, frac) == pytest.approx(0.0, abs=1e-12)
        for x in (0.1, 0.25, 0.5, 0.9):
            p = start + x * frac
            assert tg.lr_multiplier(p, frac) == pytest.approx(0.5 * (1 + math.cos(math.pi * x)), abs=1e-12)
        ps = [start + i / 100 * frac for i in range(101)]
        ms = [tg.lr_multiplier(p, frac) for p in ps]
        assert all(a >= b for a, b in zip(ms, ms[1:]))


def test_muon_momentum_schedule():
    hp = tg.Hyperparameters()
    assert tg.muon_momentum_at(0, hp) == pytest.approx(0.92)
    assert tg.muon_momentum_at(750, hp) == pytest.approx(0.955)
    assert tg.muon_momentum_at(375, hp) == pytest.approx(0.92 + 0.07 / 4)
    for s in (1500, 1501, 20000):
        assert tg.muon_momentum_at(s, hp) == pytest.approx(0.99)


def test_ema_and_swa():
    hp = tg.Hyperparameters(ema_decay=0.9, swa_every=2, swa_lr_threshold=0.2, swa_weight=0.3)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    avg = tg.WeightAverager(model, hp)
    ema = [p.detach().clone() for p in model.parameters()]
    snaps = []
    lr_mults = [1.0, 0.5, 0.3, 0.19, 0.15, 0.1, 0.05, 0.0]
    for step, lr_mult in enumerate(lr_mults, start=1):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        avg.update(step, lr_mult)
        ema = [0.9 * e + 0.1 * p.detach() for e, p in zip(ema, model.parameters())]
        if lr_mult < 0.2 and step % 2 == 0:
            snaps.append([p.detach().clone() for p in model.parameters()])
        for e, mine in zip(avg.ema, ema):
            assert torch.allclose(e, mine, atol=1e-6)
    assert avg.swa_count == len(snaps) == 3  # steps 4, 6, 8: LR multiplier < 0.2 and step % 2 == 0
    avg.apply_final()
    for p, e, *ss in zip(model.parameters(), ema, *snaps):
        assert torch.allclose(p, 0.7 * e + 0.3 * torch.stack(ss).mean(0), atol=1e-6)

    # no snapshots: EMA alone
    model2 = nn.Linear(3, 2)
    avg2 = tg.WeightAverager(model2, hp)
    ema2 = [p.detach().clone() for p in model2.parameters()]
    for step in range(1, 4):
        with torch.no_grad():
            for p in model2.parameters():
                p.add_(1.0)
        avg2.update(step, 1.0)
        ema2 = [0.9 * e + 0.1 * p.detach() for e, p in zip(ema2, model2.parameters())]
    assert avg2.swa_count == 0
    avg2.apply_final()
    for p, e in zip(model2.parameters(), ema2):
        assert torch.allclose(p, e, atol=1e-6)
# -----------------------------------------------------------------------------------------------------
# No host synchronization inside a training step (issue 13)
# -----------------------------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__")


def record_host_reads(monkeypatch) -> list:
    """Every Tensor -> Python value read made by train_gpt.py code on the main thread: on CUDA each one
    waits for the GPU (a host sync). Reads in the loader's prefetch thread are off the critical path."""
    import threading
    calls = []
    for name in HOST_READS:
        def guard(self, *args, _orig=getattr(torch.Tensor, name), _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_code.co_filename == tg.__file__ and threading.current_thread() is threading.main_thread():
                calls.append(f"{_name} in {caller.f_code.co_name}:{caller.f_lineno}")
            return _orig(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guard)
    return calls


def test_training_step_reads_nothing_back_from_the_device(corpus, monkeypatch):
    """Trainer.step (loader, bigram weights and counts, forward/backward, both optimizers, clipping) and
    the EMA/SWA update never read a tensor value into Python; the guard does catch such a read."""
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"))
    trainer = make_trainer(hp)
    loader = tg.DistributedTokenLoader(hp.data_path, trainer.d)
    counter = tg.BigramCounter(hp.vocab_size, hp.complement_alpha, torch.device("cpu"))
    averager = tg.WeightAverager(trainer.model, hp)
    calls = record_host_reads(monkeypatch)
    for step in range(1, 4):
        loss = trainer.step(loader, counter, 0.1, 0.95, qat=step == 3)
        averager.update(step, 0.1)  # lr_mult < SWA_LR_THRESHOLD: the SWA branch runs too
    assert averager.swa_count >= 1
    assert calls == [] and loss.dim() == 0
    clock = tg.SharedClock(trainer.d)  # the loop's one read per step, a step late, outside Trainer.step: caught
    clock.post([1.0])
    clock.post([2.0])
    assert clock.read() == [1.0] and calls and calls[0].startswith("tolist in read")


def test_step_path_source_has_no_host_reads():
    """Inspection of every function a training step runs: no .item()/.tolist()/.cpu()/.numpy(), no
    float()/int()/bool() of a tensor, no synchronize."""
    import inspect
    fns = [tg.Trainer.step, tg.DistributedTokenLoader.next_batch, tg.TokenStream.take, tg.BigramCounter.weights,
           tg.BigramCounter.update, tg.ParallelMuon.launch_reduce_scatter, tg.ParallelMuon.wait_reduce_scatter,
           tg.ParallelMuon.owned_grad_sq_norm, tg.ParallelMuon.step, tg.zeropower_via_newtonschulz5,
           tg.all_reduce_grads, tg.WeightAverager.update, tg.causal_attention, tg.GPT.hidden, tg.GPT.forward]
    pattern = re.compile(r"\.(item|tolist|cpu|numpy)\(|(?<![\w.])(float|int|bool)\(|synchronize|\bsync\(")
    for fn in fns:
        src = inspect.getsource(fn)
        assert not pattern.search(src), (fn.__qualname__, pattern.search(src).group(0))
