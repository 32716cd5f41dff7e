"""MixMin: the convex objective and its gradient against autograd, the mirror
descent against a closed form (K=2), a grid (K=3) and scipy at 2048-token rows,
its length invariance, monotone decrease and stopping rules (the public code's
and ours), the per-row log-likelihoods against `Objective.loss`, group weights
and the held-out split, the search on a fake context, and end to end."""
import json
import math

import numpy as np
import pytest
import torch
from conftest import compose, method, run_cli, scripted_context

from baselines.mirror_descent import mirror_descent, mixmin_grad, mixmin_loss
from baselines.mixmin import row_logliks, split_rows, stack_rows
from fastmix.errors import UserError
from fastmix.search.objective import Objective
from fastmix.train.cost import CostMeter
from fastmix.train.models import build_model, flop_params

PUBLIC = {"step": "public", "max_steps": 100, "tol": 1e-4, "stop_rule": "raw"}  # mixmin_gen.py
SHAPE = {"layers": 1, "hidden": 16, "ffn": 32, "heads": 2, "context": 12}
V = 40


def random_case(K=3, N=20, seed=0):
    g = np.random.default_rng(seed)
    lengths = g.integers(1, 6, N).astype(float)
    ll = -g.uniform(0.5, 3.0, (K, N)) * lengths  # total log-likelihood of a row = per-token x length
    return ll, lengths


# ---- the objective ------------------------------------------------------------------------------

def test_loss_divides_by_length_outside_the_logsumexp():
    # 2 sources, 2 rows of lengths 1 and 2; per-row mixture likelihood by hand
    ll = np.log(np.array([[0.5, 0.04], [0.1, 0.09]]))
    w = np.array([0.25, 0.75])
    hand = -0.5 * (math.log(0.25 * 0.5 + 0.75 * 0.1) / 1 + math.log(0.25 * 0.04 + 0.75 * 0.09) / 2)
    assert mixmin_loss(w, ll, [1.0, 2.0]) == pytest.approx(hand, rel=1e-12)
    # not the per-token log-likelihoods mixed inside (length inside the log-sum-exp)
    inside = -0.5 * (math.log(0.25 * 0.5 + 0.75 * 0.1) + math.log(0.25 * 0.2 + 0.75 * 0.3))
    assert abs(mixmin_loss(w, ll, [1.0, 2.0]) - inside) > 1e-3


def test_gradient_matches_autograd_and_survives_long_rows():
    ll, lengths = random_case(K=4, N=30)
    c = np.random.default_rng(1).dirichlet(np.ones(30))
    w = np.array([0.1, 0.2, 0.3, 0.4])
    wt = torch.tensor(w, requires_grad=True)
    lt, nt, ct = torch.tensor(ll), torch.tensor(lengths), torch.tensor(c)
    loss = -(ct * torch.logsumexp(lt + torch.log(wt)[:, None], dim=0) / nt).sum()
    loss.backward()
    assert mixmin_loss(w, ll, lengths, c) == pytest.approx(loss.item(), rel=1e-12)
    assert np.allclose(mixmin_grad(w, ll, lengths, c), wt.grad.numpy(), rtol=1e-10)
    # rows of thousands of tokens: exp(l) underflows, the shifted form does not
    big = ll * 1000
    assert np.isfinite(mixmin_loss(w, big, lengths * 1000))
    assert np.all(np.isfinite(mixmin_grad(w, big, lengths * 1000)))


# ---- the optimiser ------------------------------------------------------------------------------

@pytest.mark.parametrize("step", ["length", "public"])
def test_two_sources_match_the_closed_form(step):
    """f'(w) = sum_n u_n d_n / (b_n + w d_n) = 0 with u = c / len, d = a - b, two rows:
    w* = -(u1 d1 b2 + u2 d2 b1) / ((u1 + u2) d1 d2)."""
    a, b = np.array([0.5, 0.1]), np.array([0.1, 0.4])  # each proxy's likelihood of the two rows
    lengths, c = np.array([1.0, 3.0]), np.array([0.3, 0.7])
    ll = np.stack([np.log(a), np.log(b)])
    u, d = c / lengths, a - b
    w_star = -(u[0] * d[0] * b[1] + u[1] * d[1] * b[0]) / ((u[0] + u[1]) * d[0] * d[1])
    assert w_star == pytest.approx(0.640625)  # = 0.041 / 0.064, inside (0, 1)
    w, curve = mirror_descent(ll, lengths, c, max_steps=5000, tol=0.0, step=step)
    assert w[0] == pytest.approx(w_star, abs=1e-6) and w.sum() == pytest.approx(1.0)
    assert curve[-1]["step"] == 5000 and curve[-1]["stopped"] == "max_steps" and not curve[-1]["converged"]
    # the curve is subsampled past step 100 (every 10th to 1000, every 100th after), the end kept
    assert [r["step"] for r in curve] == list(range(100)) + list(range(100, 1000, 10)) + \
        list(range(1000, 5001, 100))


def test_three_sources_match_a_grid_search():
    ll, lengths = random_case(K=3, N=25, seed=3)
    step = 0.002
    grid = [(i * step, j * step) for i in range(501) for j in range(501 - i)]
    W = np.array([(x, y, max(0.0, 1 - x - y)) for x, y in grid])
    losses = np.array([mixmin_loss(w, ll, lengths) for w in W])
    w_grid = W[losses.argmin()]
    w, _ = mirror_descent(ll, lengths, max_steps=3000, tol=0.0)
    assert mixmin_loss(w, ll, lengths) <= losses.min() + 1e-9
    assert np.abs(w - w_grid).max() < 0.01, (w, w_grid)
    assert 0.05 < w.min()  # the case has an interior optimum, not a corner


def test_objective_decreases_monotonically_at_the_published_settings():
    ll, lengths = random_case(K=5, N=40, seed=7)
    w, curve = mirror_descent(ll, lengths, **PUBLIC)  # eta 1, 100 steps, tol 1e-4
    losses = [r["loss"] for r in curve]
    assert len(curve) == 101 and curve[-1]["stopped"] == "max_steps"
    assert all(b <= a + 1e-15 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0] - 1e-3
    assert curve[0]["weights"] == pytest.approx([0.2] * 5)
    assert curve[-1]["weights"] == pytest.approx(w.tolist())


def test_stopping_rule_is_checked_after_the_update():
    ll, lengths = random_case(K=3, N=10, seed=2)
    # rows of 10^5 tokens: every |grad| < 1/len = 1e-5 < tol, so one step is taken and the loop stops
    w, curve = mirror_descent(ll, lengths * 1e5, **PUBLIC)
    assert len(curve) == 2 and curve[-1]["stopped"] == "tolerance" and curve[0]["max_abs_grad"] < 1e-4
    assert np.abs(w - 1 / 3).max() > 1e-7  # the update was applied before stopping
    # the raw gradient at an optimum is -sum c / len, not 0: with short rows the rule never fires
    sym = np.array([[-1.0, -2.0], [-2.0, -1.0]])  # uniform is the optimum by symmetry
    w, curve = mirror_descent(sym, np.ones(2), **{**PUBLIC, "max_steps": 37})
    assert len(curve) == 38 and curve[-1]["stopped"] == "max_steps" and w == pytest.approx([0.5, 0.5])
    # ours are tested before the update: uniform already meets them, no step is taken
    for rule in ("gap", "centered"):
        w, curve = mirror_descent(sym, np.ones(2), stop_rule=rule)
        assert len(curve) == 1 and curve[-1]["stopped"] == "tolerance" and curve[-1]["converged"]


# ---- long rows (issue 12): the default converges at any row length, the public loop does not ------

def per_token_case(L, K=4, N=300, seed=0):
    """Rows of L tokens whose total log-likelihoods differ across sources by O(1) nats (not
    O(L)): the optimum is inside the simplex even at L = 2048."""
    g = np.random.default_rng(seed)
    ll = L * -g.uniform(2.0, 4.0, N) + g.normal(0.0, 1.0, (K, N)) + np.linspace(0.0, 0.2, K)[:, None]
    return ll, np.full(N, float(L))


def scipy_optimum(ll, lengths, c=None):
    """min L over the simplex by SLSQP, on L / u minus a per-row constant (O(1) values)."""
    from scipy.optimize import minimize
    K, N = ll.shape
    c = np.full(N, 1.0 / N) if c is None else c
    c_hat = c / lengths / (c / lengths).sum()
    top = ll.max(axis=0)
    p = np.exp(ll - top)

    def f(w):
        m = w @ p
        return -(c_hat * np.log(m)).sum(), -(p / m) @ c_hat
    res = minimize(f, np.full(K, 1.0 / K), jac=True, method="SLSQP", bounds=[(0.0, 1.0)] * K,
                   constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones(K)}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    assert res.success, res.message
    return res.x


def test_reaches_the_optimum_at_2048_token_rows():
    ll, lengths = per_token_case(2048)
    c = np.random.default_rng(5).dirichlet(np.ones(ll.shape[1]))  # weighted groups too
    w_ref = scipy_optimum(ll, lengths, c)
    assert 0.05 < w_ref.min()  # an interior optimum
    w, curve = mirror_descent(ll, lengths, c)  # the defaults
    assert curve[-1]["converged"] and curve[-1]["gap"] < 1e-5 and curve[-1]["step"] < 100
    assert np.abs(w - w_ref).max() < 1e-4, (w, w_ref)
    assert mixmin_loss(w, ll, lengths, c) <= mixmin_loss(w_ref, ll, lengths, c) + 1e-12
    # the public loop (eta 1 on grad L ~ 1/2048) barely leaves uniform
    w_pub, _ = mirror_descent(ll, lengths, c, **PUBLIC)
    assert np.abs(w_pub - 0.25).max() < 0.01 < np.abs(w_pub - w_ref).max()


def test_single_source_optimum_at_2048_token_rows():
    """Source 0 is better on every row by 0.01 nat a token: the optimum is the corner e_0 (at
    it grad_k = -sum c^ exp(l_k - l_0) > -1 = grad_0). Issue 12 measured 0.452 on the
    objective's source at 512-token rows with the public loop."""
    g = np.random.default_rng(1)
    K, N, L = 5, 200, 2048
    p = -g.uniform(2.0, 4.0, N) + g.normal(0.0, 0.002, (K, N))
    p[0] += 0.01
    ll, lengths = p * L, np.full(N, float(L))
    w_pub, _ = mirror_descent(ll, lengths, **PUBLIC)
    w, curve = mirror_descent(ll, lengths)
    assert w_pub[0] < 0.3 and w[0] > 1 - 1e-5 and curve[-1]["converged"] and curve[-1]["step"] < 20
    # the centred gradient does not vanish at a corner (the others' grad_k - <w, grad> -> ~1): the
    # gap does; `centered` runs to its cap with the same w
    w_c, curve_c = mirror_descent(ll, lengths, stop_rule="centered", max_steps=200)
    assert curve_c[-1]["stopped"] == "max_steps" and curve_c[-1]["centered_grad"] > 0.5 and w_c[0] > 1 - 1e-5


def test_same_weights_at_64_and_2048_token_rows():
    # exactly: lengths x 32 with the same l scale L by 1/32, the same minimiser; steps on L / u are
    # the same steps, the public loop's are 32 times smaller
    ll, lengths = per_token_case(64)
    w64, c64 = mirror_descent(ll, lengths)
    w2k, c2k = mirror_descent(ll, lengths * 32)
    assert np.abs(w64 - w2k).max() < 1e-12 and c64[-1]["step"] == c2k[-1]["step"]
    p64, _ = mirror_descent(ll, lengths, **PUBLIC)
    p2k, _ = mirror_descent(ll, lengths * 32, **PUBLIC)
    assert np.abs(p64 - p2k).max() > 0.05
    # the same per-token likelihoods at both lengths: each row's best source beats the others by
    # 0.2 nat a token (responsibilities one-hot within e^-12.8 at 64 tokens), so the optimum is
    # the share of rows each source wins, at both lengths
    g = np.random.default_rng(2)
    K, N = 4, 400
    best = g.choice(K, N, p=[0.5, 0.3, 0.2, 0.0])
    p = -g.uniform(2.0, 4.0, N) - 0.2 + 0.2 * (np.arange(K)[:, None] == best[None, :]) \
        + g.uniform(-0.01, 0.01, (K, N))
    share = np.bincount(best, minlength=K) / N
    out = {}
    for L in (64, 2048):
        w, curve = mirror_descent(p * L, np.full(N, float(L)))
        assert curve[-1]["converged"] and np.abs(w - share).max() < 1e-4, (L, w, share)
        out[L] = mirror_descent(p * L, np.full(N, float(L)), **PUBLIC)[0]
    assert out[64][0] - out[2048][0] > 0.1  # the public loop: far apart, 2048 near uniform


def test_line_search_stops_the_overshoot_and_the_curve_is_in_the_trace():
    """17 sources, 2048-token rows, one-hot responsibilities (90% of rows won by source 0, 10% by
    source 1): a unit step from a weight w_1 ~ 1e-7 would multiply it by exp(0.1 / w_1)."""
    g = np.random.default_rng(3)
    K, N, L = 17, 1000, 2048
    p = -3.0 + g.normal(0.0, 0.001, (K, N))
    p[0, :900] += 0.1
    p[1, 900:] += 0.1
    w, curve = mirror_descent(p * L, np.full(N, float(L)))
    assert curve[-1]["converged"] and curve[-1]["halvings"] > 0
    assert w[:2] == pytest.approx([0.9, 0.1], abs=1e-4)
    losses = [r["loss"] for r in curve]
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    # the curve: every step's L, gap, centred gradient, step size and weights, then the end
    assert [r["step"] for r in curve] == list(range(len(curve)))
    for r in curve:
        assert {"loss", "gap", "centered_grad", "max_abs_grad", "stop_criterion", "weights"} <= set(r)
    assert all(r["eta"] > 0 for r in curve[:-1]) and "eta" not in curve[-1]
    assert curve[-1]["stopped"] == "tolerance" and curve[-1]["weights"] == pytest.approx(w.tolist())
    json.dumps(curve, allow_nan=False)


# ---- rows, groups and the split -----------------------------------------------------------------

class TwoGroups(Objective):
    """A hand-made objective: 'plain' rows (no mask) and 'qa' rows with a loss mask."""

    def __init__(self, weights=None):
        super().__init__(corpus=None, batch_size=3)
        self.name, self.weights = "two", weights or {"plain": 0.7, "qa": 0.3}

    def build_rows(self, context):
        g = torch.Generator().manual_seed(0)
        plain = torch.randint(0, V, (5, context + 1), generator=g)
        qa = torch.randint(0, V, (4, context + 1), generator=g)
        mask = (torch.arange(context)[None, :] >= torch.tensor([[2], [5], [9], [11]])).float()
        return {"plain": (plain, None), "qa": (qa, mask)}


def test_row_logliks_agree_with_the_objective_loss_and_are_charged():
    model = build_model(SHAPE, V, seed=1)
    obj = TwoGroups()
    meter = CostMeter(torch.device("cpu"))
    with meter.stage("search"):
        rows = obj.rows(SHAPE["context"])
        per_row = row_logliks(model, rows, torch.device("cpu"), meter, "fp32", batch_size=2)
    assert per_row["plain"][1].tolist() == [SHAPE["context"]] * 5
    assert per_row["qa"][1].tolist() == [10, 7, 3, 1]  # counted tokens under the mask
    # sum_g w_g (-sum_n l_n / sum_n len_n) is the objective's token-mean loss
    again = sum(obj.weights[g] * -ll.sum() / n.sum() for g, (ll, n) in per_row.items())
    assert again == pytest.approx(obj.loss(model, torch.device("cpu"), None, "fp32"), rel=1e-6)
    assert meter.stages["search"].flops == 2.0 * flop_params(model) * 9 * SHAPE["context"]


def test_group_weights_weight_the_rows_and_the_split_is_stratified():
    per_source = [{"a": (np.zeros(2), np.ones(2)), "b": (np.zeros(4), np.ones(4))}]
    ll, _, c = stack_rows(per_source, {"a": 0.5, "b": 0.5}, {"a": np.ones(2, bool), "b": np.ones(4, bool)})
    assert c.tolist() == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125] and ll.shape == (1, 6)
    held = split_rows({"a": 10, "b": 3, "c": 1}, 0.2, np.random.default_rng(0))
    assert [int(m.sum()) for m in held.values()] == [2, 1, 0]
    again = split_rows({"a": 10, "b": 3, "c": 1}, 0.2, np.random.default_rng(0))
    assert all(np.array_equal(held[g], again[g]) for g in held)
    # held-out rows of one group only: its weight is renormalised to 1
    pick = {"a": np.zeros(2, bool), "b": np.eye(4, dtype=bool)[0]}
    _, _, c = stack_rows(per_source, {"a": 0.5, "b": 0.5}, pick)
    assert c.tolist() == [1.0]


@pytest.mark.parametrize("override", ["eta=0", "step=adam", "max_steps=0", "stop_rule=grad", "holdout=1.0",
                                      "proxy_tokens=0", "batch_size=0", "tol=-1"])
def test_bad_options_are_refused(override):
    from fastmix.run.pipeline import build
    with pytest.raises(UserError, match=f"optimizer.{override.split('=')[0]}="):
        build(compose(["optimizer=mixmin", f"optimizer.{override}"]).optimizer)


def test_yaml_builds_ours_and_the_published_values():
    from fastmix.run.pipeline import build
    opt = build(compose(["optimizer=mixmin"]).optimizer)
    assert (opt.eta, opt.step, opt.max_steps, opt.tol, opt.stop_rule, opt.holdout) == \
        (1.0, "length", 2000, 1e-5, "gap", 0.2)
    assert opt.planned_proxy_runs(17) == 17
    public = [f"optimizer.{k}={v}" for k, v in PUBLIC.items()]
    pub = build(compose(["optimizer=mixmin"] + public).optimizer)
    assert (pub.eta, pub.step, pub.max_steps, pub.tol, pub.stop_rule) == (1.0, "public", 100, 1e-4, "raw")


# ---- the search ---------------------------------------------------------------------------------

def test_search_on_saved_proxies(tmp_path):
    """Three saved models stand in for the proxies: one call to run_proxies with one-hot
    mixtures and keep_model, one charged scoring pass per proxy, the curve in the trace."""
    sources = ["x", "y", "z"]
    models = [build_model(SHAPE, V, seed=s) for s in range(3)]
    for i, m in enumerate(models):
        m.save_pretrained(tmp_path / f"p{i}")
    ctx = scripted_context(dict.fromkeys(sources, 1 / 3), TwoGroups(), tmp_path,
                           lambda job: (1.0, str(tmp_path / f"p{job.index}")), proxy={"precision": "bf16"})
    meter = ctx.meter
    with meter.stage("search"):
        res = method("mixmin").search(ctx).validated(sources)
    assert [[(j.tag, j.weights, j.keep_model, j.tokens) for j in jobs] for jobs in ctx.proxies.calls] == [
        [("mixmin", {"x": 1.0, "y": 0.0, "z": 0.0}, True, None), ("mixmin", {"x": 0.0, "y": 1.0, "z": 0.0}, True, None),
         ("mixmin", {"x": 0.0, "y": 0.0, "z": 1.0}, True, None)]]
    assert meter.stages["search"].flops == 3 * 2.0 * flop_params(models[0]) * 9 * SHAPE["context"]
    curve = [r for r in res.trace if r["kind"] == "mirror_descent"]
    assert curve[-1]["weights"] == pytest.approx(list(res.weights.values()))
    assert [r["step"] for r in curve] == list(range(len(curve))) and res.info["steps"] == len(curve) - 1
    assert res.info["converged"] and res.info["final_gap"] == curve[-1]["gap"] < 1e-5
    (held,) = [r for r in res.trace if r["kind"] == "heldout"]
    assert res.info["n_fit"] + res.info["n_heldout"] == 9
    assert held["n"] == 2  # round(0.2 x 5) + round(0.2 x 4)
    assert set(held["loss_per_source"]) == set(sources)
    json.dumps([res.trace, res.info], allow_nan=False)


def test_end_to_end(smoke_args, tiny_corpus, tmp_path):
    r = run_cli(smoke_args + ["optimizer=mixmin", "eval=loss"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = list((tmp_path / "outputs" / "runs").iterdir())
    mix = json.loads((run / "mixture.json").read_text())
    w, sources = mix["weights"], sorted(p.name for p in tiny_corpus.iterdir())
    assert sorted(w) == sources and math.isclose(sum(w.values()), 1.0, abs_tol=1e-9) and min(w.values()) > 0
    trace = [json.loads(x) for x in (run / "search_trace.jsonl").read_text().splitlines()]
    proxies = [t for t in trace if t["kind"] == "proxy"]
    assert [max(p["weights"], key=p["weights"].get) for p in proxies] == sources  # one-hot, in order
    md = [t for t in trace if t["kind"] == "mirror_descent"]
    curve = [t["loss"] for t in md]
    assert curve[-1] < curve[0] and all(b <= a + 1e-12 for a, b in zip(curve, curve[1:]))  # monotone
    assert mix["info"]["converged"] and md[-1]["gap"] < 1e-5 and mix["info"]["steps"] == md[-1]["step"]
    assert mix["info"]["heldout_loss"] > 0
    # cost: K proxy runs (training + the unit's own objective score) + one scoring pass per proxy
    from transformers import AutoModelForCausalLM
    n = flop_params(AutoModelForCausalLM.from_pretrained(proxies[0]["model_dir"]))
    res = json.loads((run / "result.json").read_text())
    assert res["search_cost"]["proxy_runs"] == len(sources)
    spent = sum(p["cost"]["flops"] for p in proxies)
    # each record: flops = 6N·D + 2N·T, tokens = D + T, T = the objective's scored tokens
    T = (6 * n * proxies[0]["cost"]["tokens"] - proxies[0]["cost"]["flops"]) / (4 * n)
    assert T > 0 and res["search_cost"]["flops"] == pytest.approx(spent + len(sources) * 2 * n * T, rel=1e-9)
