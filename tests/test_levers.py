"""Issue 21's architecture levers: depth recurrence (NUM_LOOPS...), parallel lanes, SmearGate's BOS mask, the
sparse attention gate, and the budget prediction after the loop starts; each against a reference written here."""
import time

import pytest
import torch
import torch.nn.functional as F

import train_gpt as tg
from conftest import replace, tiny_hp


def randomized(hp, seed=0):
    """A GPT whose zero-initialized parts (output projections, gates, skips) are random, so every path counts."""
    torch.manual_seed(seed)
    model = tg.GPT(hp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def reference_hidden(model, sequence, idx):
    """The blocks applied by hand in `sequence` (virtual layers), U-Net skips from the first half to the second."""
    x = model.tok_emb(idx) + model.bigram(idx)
    x = tg.rms_norm(x)
    x = model.smear(x, idx) if model.smear is not None else x
    x0, v0, outs = x, None, []
    banks = {n: getattr(model, n) for n in tg.BANKS}
    ve = model.ve(idx)
    half = len(sequence) // 2
    for j, i in enumerate(sequence):
        if j >= half and model.hp.unet_skips:
            x = x + model.skip_weights[j - half] * outs[2 * half - 1 - j]
        x, v0 = model.blocks[i](x, x0, model.layer_weights(banks, i), v0, ve)
        outs.append(x)
    return tg.rms_norm(x)


def test_settings_range_checks():
    for env, var in (({"NUM_LOOPS": "1", "LOOP_START": "1", "LOOP_END": "4"}, "LOOP_END"),
                     ({"NUM_LOOPS": "1", "LOOP_START": "3", "LOOP_END": "2"}, "LOOP_START"),
                     ({"ENABLE_LOOPING_AT": "1.5"}, "ENABLE_LOOPING_AT"),
                     ({"PARALLEL_START_LAYER": "4"}, "PARALLEL_START_LAYER"),
                     ({"ATTN_GATE_INPUTS": "65"}, "ATTN_GATE_INPUTS"),
                     ({"ATTN_GATE_INPUTS": "8", "GATED_ATTN": "0"}, "ATTN_GATE_INPUTS"),
                     ({"QK_GAIN_INIT": "0"}, "QK_GAIN_INIT"),
                     ({"NUM_LOOPS": "-1"}, "NUM_LOOPS")):
        with pytest.raises(tg.GolfError, match=f"^{var}="):
            tg.Hyperparameters.from_env({"NUM_LAYERS": "4", "MODEL_DIM": "64", "NUM_HEADS": "4", **env})
    hp = tg.Hyperparameters.from_env({"NUM_LAYERS": "4", "NUM_LOOPS": "2", "LOOP_START": "1", "LOOP_END": "2",
                                      "ENABLE_LOOPING_AT": "0.5", "PARALLEL_START_LAYER": "3",
                                      "SMEAR_GATE_BOS_FIX": "1", "ATTN_GATE_INPUTS": "12", "QK_GAIN_INIT": "5"})
    assert (hp.num_loops, hp.loop_start, hp.loop_end, hp.enable_looping_at, hp.parallel_start_layer,
            hp.smear_gate_bos_fix, hp.attn_gate_inputs, hp.qk_gain_init) == (2, 1, 2, 0.5, 3, True, 12, 5.0)
    assert {"num_loops", "loop_start", "loop_end", "parallel_start_layer", "smear_gate_bos_fix",
            "attn_gate_inputs"} <= set(tg.MODEL_FIELDS)


def test_virtual_sequence_of_the_records():
    model = tg.GPT(tg.Hyperparameters(num_layers=11, model_dim=64, num_heads=4, num_loops=2, loop_start=3, loop_end=5))
    seq = model.layer_sequence(True)
    assert seq == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]
    assert seq[:8] == [0, 1, 2, 3, 4, 5, 3, 4] and model.num_skips == 8  # PR #1493: 8 encoder, 9 decoder layers
    assert model.layer_sequence(False) == list(range(11))


def test_off_values_equal_the_plain_stack():
    """Every new setting off: the same layers, skips and parameters as before, and the plain hand-written stack."""
    hp = tiny_hp()
    model = randomized(hp)
    assert model.looping is False and model.num_skips == hp.num_encoder_layers
    assert model.smear.bos_fix is False and all(b.attn.gate.in_features == hp.model_dim and not b.parallel
                                                for b in model.blocks)
    idx = torch.randint(0, hp.vocab_size, (2, 32))
    assert torch.equal(model.hidden(idx), reference_hidden(model, list(range(hp.num_layers)), idx))


def test_looped_model_equals_layers_by_hand_and_accumulates_gradients():
    hp = tiny_hp(num_loops=2, loop_start=1, loop_end=2)
    model = randomized(hp)
    seq = [0, 1, 2, 1, 2, 1, 2, 3]
    assert model.looping and model.layer_sequence(True) == seq and model.num_skips == 4
    idx = torch.randint(0, hp.vocab_size, (2, 32))
    h = model.hidden(idx)
    ref = reference_hidden(model, seq, idx)
    assert torch.equal(h, ref)
    h.square().mean().backward()
    grads = {n: getattr(model, n).grad.clone() for n in tg.BANKS}
    model.zero_grad()
    # by hand, with separate copies of the bank per pass: the shared rows' gradient is the sum over the passes
    copies = [{n: getattr(model, n).detach().clone().requires_grad_() for n in tg.BANKS} for _ in seq]
    x = tg.rms_norm(model.tok_emb(idx) + model.bigram(idx))
    x = model.smear(x, idx)
    x0, v0, outs, ve = x, None, [], model.ve(idx)
    for j, i in enumerate(seq):
        if j >= 4:
            x = x + model.skip_weights[j - 4] * outs[7 - j]
        x, v0 = model.blocks[i](x, x0, model.layer_weights(copies[j], i), v0, ve)
        outs.append(x)
    tg.rms_norm(x).square().mean().backward()
    for n in tg.BANKS:
        assert torch.allclose(grads[n], sum(c[n].grad for c in copies), rtol=1e-5, atol=1e-7), n
    L = hp.num_layers
    n_passes = [sum(c["qo_bank"].grad[i].abs().sum() > 0 for c in copies) for i in range(L)]
    assert n_passes == [1, 3, 3, 1]  # rows of layers 1 and 2 got gradients from three passes
    model.looping = False  # before ENABLE_LOOPING_AT: the plain stack
    assert torch.equal(model.hidden(idx), reference_hidden(model, list(range(L)), idx))


def test_hessians_sum_every_pass(corpus):
    hp = tiny_hp(num_loops=1, loop_start=1, loop_end=1, data_path=str(corpus / "datasets" / "fineweb10B_sp1024"),
                 gptq_n_samples=2, eval_batch_seqs=2)
    model = randomized(hp)
    counts = {}
    slot = model.blocks[1].mlp.c_fc
    slot.register_forward_pre_hook(lambda m, a: counts.__setitem__("n", counts.get("n", 0) + 1))
    tg.collect_hessians(model, hp, tg.Dist())
    assert counts["n"] == 2  # one batch of 2 sequences, two passes over layer 1
    H = tg.collect_hessians(model, hp, tg.Dist())
    tokens = tg.TokenStream(hp.data_path).take(2 * hp.train_seq_len).view(2, -1).long()
    inputs = []
    h = slot.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, a[0].size(-1)).float()))
    with torch.no_grad():
        model.hidden(tokens)
    h.remove()
    assert len(inputs) == 2
    ref = sum(x.T @ x for x in inputs) / tokens.numel()
    assert torch.allclose(H["blocks.1.mlp.c_fc"], ref, rtol=1e-4, atol=1e-6)


def test_eval_lora_adapters_run_on_every_pass():
    """The evaluation's LoRA adapters sit in a looped layer's slots: every pass applies them and trains them."""
    hp = tiny_hp(num_loops=2, loop_start=2, loop_end=3, ttt_last_n=2)
    model = randomized(hp)
    ttt = tg.TestTimeTrainer(model, hp, tg.Dist())
    calls = []
    for lora in ttt.loras:
        lora.register_forward_hook(lambda m, a, o: calls.append(m))
    idx = torch.randint(0, hp.vocab_size, (2, 32))
    base = model.hidden(idx)
    assert len(calls) == 3 * len(ttt.loras)  # layers 2 and 3 run three times each
    base.square().mean().backward()
    assert all(float(lora.B.grad.abs().sum()) > 0 for lora in ttt.loras)
    with torch.no_grad():
        for lora in ttt.loras:
            lora.B.normal_()
    assert not torch.allclose(model.hidden(idx), base)


def test_loop_ratio_without_warmup(monkeypatch):
    """No warm-up to measure: the prediction scales by virtual / physical layers."""
    hp = tiny_hp(num_loops=2, loop_start=1, loop_end=2, max_wallclock_seconds=40.0, export_reserve_seconds=4.0)
    monkeypatch.setattr(tg, "export", lambda *a, **k: None)
    trainer = tg.Trainer(hp, tg.Dist(), tg.GPT(hp), None, None, None, [])
    plan = tg.plan_budget(trainer, lambda msg: None, {})
    assert plan.loop_ratio == 8 / 4
    assert plan.step_estimate(1.0, 5, 5) == 2.0 and plan.step_estimate(1.0, 6, 5) == 1.0
    assert plan.step_estimate(1.0, 5, None) == 1.0


def test_parallel_lanes_formula():
    hp = tiny_hp(parallel_start_layer=2)
    model = randomized(hp)
    assert [b.parallel for b in model.blocks] == [False, False, True, True]
    block = model.blocks[3]
    W = model.layer_weights({n: getattr(model, n) for n in tg.BANKS}, 3)
    x, x0 = torch.randn(2, 16, hp.model_dim), torch.randn(2, 16, hp.model_dim)
    v0 = torch.randn(2, 16, hp.num_kv_heads, hp.head_dim)
    ve = torch.randn(2, 16, hp.kv_dim)
    out, _ = block(x, x0, W, v0, ve)
    xm = block.resid_mix[0] * x + block.resid_mix[1] * x0
    n = tg.rms_norm(xm) * block.ln_scale
    attn, _ = block.attn(n, W["q"], W["k"], W["v"], W["o"], v0, ve)
    mlp = F.leaky_relu(n @ W["up"].T, tg.LEAKY_SLOPE).square() @ W["down"].T
    assert torch.allclose(out, xm + block.attn_scale * attn + block.mlp_scale * mlp, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, _serial(block, xm, W, v0, ve), atol=1e-4)  # the lanes change the result


def _serial(block, xm, W, v0, ve):
    h, _ = block.attn(tg.rms_norm(xm) * block.ln_scale, W["q"], W["k"], W["v"], W["o"], v0, ve)
    x = xm + block.attn_scale * h
    return x + block.mlp_scale * block.mlp(tg.rms_norm(x) * block.ln_scale, W["up"], W["down"])


def test_smear_bos_mask_isolates_documents():
    torch.manual_seed(0)
    D, T, bos = 16, 12, 5
    idx = torch.randint(2, 50, (1, T))
    idx[0, bos] = tg.BOS_ID
    for fix in (True, False):
        smear = tg.SmearGate(D, bos_fix=fix)
        with torch.no_grad():
            smear.gate.normal_()
        x = torch.randn(1, T, D)
        y = torch.randn(1, T, D)
        y[:, bos:] = x[:, bos:]  # another previous document, the same document from the BOS on
        same = torch.equal(smear(x, idx)[:, bos:], smear(y, idx)[:, bos:])
        assert same is fix  # without the mask the previous document's last token leaks into the BOS position
    g = torch.sigmoid(smear.gate)
    smear.bos_fix = True
    out = smear(x, idx)
    assert torch.allclose(out[0, bos], (1 - g) * x[0, bos]) and torch.allclose(out[0, bos + 1], (1 - g) * x[0, bos + 1]
                                                                              + g * x[0, bos])


def test_sparse_gate_equals_dense_gate_with_zero_columns():
    hp = tiny_hp(attn_gate_inputs=12)
    sparse = randomized(hp).blocks[2].attn
    assert tuple(sparse.gate.weight.shape) == (hp.num_heads, 12)
    dense = tg.CausalSelfAttention(replace(hp, attn_gate_inputs=0), 2)
    sd = dict(sparse.state_dict())
    sd["gate.weight"] = F.pad(sd["gate.weight"], (0, hp.model_dim - 12))
    dense.load_state_dict(sd)
    torch.manual_seed(1)
    W = {k: torch.randn(r, c) / 8 for k, (r, c) in dict(q=(64, 64), k=(32, 64), v=(32, 64), o=(64, 64)).items()}
    x, v0 = torch.randn(2, 16, hp.model_dim), torch.randn(2, 16, hp.num_kv_heads, hp.head_dim)
    ve = torch.randn(2, 16, hp.kv_dim)
    a, _ = sparse(x, W["q"], W["k"], W["v"], W["o"], v0, ve)
    b, _ = dense(x, W["q"], W["k"], W["v"], W["o"], v0, ve)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[..., 12:] += 1.0  # the sparse gate does not read these channels; the rest of attention does
    g = lambda m, inp: torch.sigmoid(m.gate(inp[..., :12] if m.gate_inputs else inp))
    assert torch.equal(g(sparse, x), g(sparse, x2))


# -----------------------------------------------------------------------------------------------------
# Training: activation, the warm-up of both variants, the budget after the loop starts
# -----------------------------------------------------------------------------------------------------

class FakeClock:
    """time.perf_counter for train_gpt that only training steps advance: plain steps 1 s, looped steps 4 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


def make_trainer(hp, calls, clock=None):
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    muon, adam, replicated = tg.build_optimizers(model, hp, tg.Dist())

    def step_fn(x, y, weights, qat):
        calls.append((model.looping, qat))
        if clock is not None:
            clock.now += (4.0 if model.looping else 1.0) / 8  # 8 micro-batches per step
        return model(x, y, weights, qat)

    return tg.Trainer(hp, tg.Dist(), model, step_fn, muon, adam, replicated)


def test_step_based_activation_and_warmup_variants(corpus, sp):
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"), num_loops=1, loop_start=1, loop_end=2,
                 enable_looping_at=0.5, iterations=4, warmup_steps=4, late_qat_frac=0.75)
    calls = []
    trainer = make_trainer(hp, calls)
    val = tg.load_validation_tokens(hp.data_path, hp.vocab_size)
    lines = []
    tg.train_model(trainer, val, tg.build_byte_luts(sp, hp.vocab_size), lines.append)
    steps = calls[::8]
    assert steps[:4] == [(False, False), (False, True), (True, False), (True, True)]  # every variant warmed up
    assert steps[4:] == [(False, False), (False, False), (True, False), (True, True)]  # loop from step 2 of 4
    assert any(l.startswith("looping_started: step:2 ") and "layers:0,1,2,1,2,3" in l for l in lines), lines
    assert trainer.model.looping  # the exported network loops


@pytest.mark.parametrize("enable_at,scaled", [(0.3, True), (0.8, True), (0.8, False)])
def test_budget_prediction_after_a_step_time_jump(corpus, sp, monkeypatch, enable_at, scaled):
    """Looped steps cost 4x (a fake clock). With the warm-up's ratio the run ends inside the budget, whether the
    loop starts early (looped steps run) or late (it stops instead of starting one); predicting from the last
    plain step, as before, a late start runs past the budget."""
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"), num_loops=2, loop_start=1, loop_end=2,
                 enable_looping_at=enable_at, iterations=10_000, warmup_steps=2, max_wallclock_seconds=24.0,
                 export_reserve_seconds=2.0, late_qat_frac=1.0, train_log_every=10_000)
    clock = FakeClock()
    monkeypatch.setattr(tg, "time", clock)
    monkeypatch.setattr(tg, "export", lambda *a, **k: None)  # the probe: the reserve only (EXPORT_RESERVE_SECONDS)
    if not scaled:
        monkeypatch.setattr(tg.BudgetPlan, "step_estimate", lambda self, last, n, loop_from: last)
    calls = []
    trainer = make_trainer(hp, calls, clock)
    val = tg.load_validation_tokens(hp.data_path, hp.vocab_size)
    lines = []
    res = tg.train_model(trainer, val, tg.build_byte_luts(sp, hp.vocab_size), lines.append)
    plan_line = next(l for l in lines if l.startswith("budget_plan:"))
    assert plan_line.endswith("loop_step_ratio:4.00")  # measured in the warm-up (> 8 virtual / 4 layers)
    assert any(l.startswith("looping_started:") for l in lines), lines
    looped = sum(1 for lp, _ in calls[2 * 8::8] if lp)
    assert (looped > 0) is (enable_at < 0.5 or not scaled), (looped, lines)
    within = res.train_seconds + res.export_estimate <= hp.max_wallclock_seconds
    assert within is scaled, (res, lines)


def test_compiled_variants_all_warmed_up(corpus, sp, monkeypatch):
    """torch.compile (eager backend, counting graphs): the warm-up compiles the loop x QAT variants; the timed
    run after it compiles nothing new, however the loop and QAT switch."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    hp = tiny_hp(data_path=str(corpus / "datasets" / "fineweb10B_sp1024"), num_layers=2, xsa_last_n=1, ve_last_n=1,
                 ttt_last_n=1, num_loops=1, loop_start=1, loop_end=1, enable_looping_at=0.3, late_qat_frac=0.6,
                 iterations=4, warmup_steps=4)
    torch.manual_seed(hp.seed)
    model = tg.GPT(hp)
    muon, adam, replicated = tg.build_optimizers(model, hp, tg.Dist())
    counter = CompileCounter()
    trainer = tg.Trainer(hp, tg.Dist(), model, torch.compile(model, backend=counter, dynamic=False), muon, adam,
                         replicated)
    after_warmup = []
    warmup = tg.warmup_and_restore
    monkeypatch.setattr(tg, "warmup_and_restore", lambda t, log: (warmup(t, log), after_warmup.append(
        counter.frame_count))[0])
    lines = []
    tg.train_model(trainer, tg.load_validation_tokens(hp.data_path, hp.vocab_size),
                   tg.build_byte_luts(sp, hp.vocab_size), lines.append)
    assert any(l.startswith("looping_started: step:2 ") for l in lines)
    assert after_warmup[0] >= 4 and counter.frame_count == after_warmup[0]
    torch._dynamo.reset()
