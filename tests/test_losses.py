import math

import pytest
import torch
from torch.nn import functional as F

from siclip.distill import ContrastiveRelationDistillation, FeatureDistillation, InteractiveContrastiveLoss
from siclip.distill import ObjectiveConfig, SiCLIPObjective
from siclip.losses import ClipLoss, PairMatchingLoss, SigLipLoss

D = torch.float64


def unit(n, d, requires_grad=True):
    return F.normalize(torch.randn(n, d, dtype=D), dim=-1).requires_grad_(requires_grad)


def grads(loss_fn, *inputs):
    inputs = [x.detach().clone().requires_grad_(True) for x in inputs]
    loss = loss_fn(*inputs)
    return loss, torch.autograd.grad(loss, inputs)


def assert_same(impl, ref, *inputs, tol=1e-10):
    l1, g1 = grads(impl, *inputs)
    l2, g2 = grads(ref, *inputs)
    torch.testing.assert_close(l1, l2, rtol=tol, atol=tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# Plain references: explicit sums over rows, written from the formulas.
def ref_ce_rows(logits):
    n = logits.shape[0]
    return sum(torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(n)) / n


def ref_clip(v, t, s):
    logits = s * v @ t.T
    return (ref_ce_rows(logits) + ref_ce_rows(logits.T)) / 2


def ref_kl_rows(teacher, student):
    total = 0
    for i in range(teacher.shape[0]):
        p = torch.softmax(teacher[i], 0)
        total = total + (p * (torch.log(p) - torch.log_softmax(student[i], 0))).sum()
    return total / teacher.shape[0]


def test_clip_loss_matches_reference(seed):
    v, t = unit(9, 7), unit(9, 7)
    assert_same(lambda v, t: ClipLoss()(v, t, torch.tensor(13.0, dtype=D)), lambda v, t: ref_clip(v, t, 13.0), v, t)
    # the scale is used as given: the bound lives on the parameter (clamped after each optimiser step)
    assert_same(lambda v, t: ClipLoss()(v, t, torch.tensor(500.0, dtype=D)), lambda v, t: ref_clip(v, t, 500.0), v, t)


def test_clip_loss_limits_and_gradcheck(seed):
    eye = torch.eye(6, 6, dtype=D)
    assert ClipLoss()(eye, eye, 100.0).item() < 1e-30 + 6 * math.exp(-99)
    uniform = F.normalize(torch.ones(5, 4, dtype=D), dim=-1)
    assert ClipLoss()(uniform, uniform, 10.0).item() == pytest.approx(math.log(5))
    v, t = unit(4, 3), unit(4, 3)
    scale = torch.tensor(3.0, dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, t, s: ClipLoss()(v, t, s), (v, t, scale))


def test_siglip_matches_reference(seed):
    v, t = unit(6, 5), unit(6, 5)
    loss = SigLipLoss(init_scale=7.0, init_bias=-3.0).double()

    def ref(v, t):
        z = loss.logit_scale.exp() * v @ t.T + loss.logit_bias  # float32-initialised parameters
        signs = 2 * torch.eye(6, dtype=D) - 1
        return -sum(F.logsigmoid(signs[i, j] * z[i, j]) for i in range(6) for j in range(6)) / 6

    assert_same(lambda v, t: loss(v, t), ref, v, t)


@pytest.mark.parametrize("form", ["hyperplane", "cosine"])
@pytest.mark.parametrize("negatives", [1, 3])
def test_pair_matching_matches_reference_with_hard_negatives(seed, form, negatives):
    pm = PairMatchingLoss(5, form=form, negatives=negatives).double()
    with torch.no_grad():
        for p in pm.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    v, t = unit(7, 5), unit(7, 5)

    def score(a, b):
        return (a * b) @ pm.weight + pm.bias if form == "hyperplane" else pm.log_scale.exp() * (a * b).sum() + pm.bias

    def ref(v, t):
        sim = (v @ t.T).detach()
        pos, neg = [], []
        for i in range(7):
            pos.append(-F.logsigmoid(score(v[i], t[i])))
            order_t = [j for j in sorted(range(7), key=lambda j: -sim[i, j]) if j != i][:negatives]
            order_v = [j for j in sorted(range(7), key=lambda j: -sim[j, i]) if j != i][:negatives]
            neg += [-F.logsigmoid(-score(v[i], t[j])) for j in order_t]
            neg += [-F.logsigmoid(-score(v[j], t[i])) for j in order_v]
        return 0.5 * sum(pos) / len(pos) + 0.5 * sum(neg) / len(neg)

    assert_same(lambda v, t: pm(v, t), ref, v, t, tol=1e-9)


def test_sampled_negatives_follow_the_softmax_and_skip_positives(seed):
    pm = PairMatchingLoss(4, mining="sampled", temperature=0.5)
    sim = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.8, 0.6], [0.3, 0.0, 0.7]])
    g = torch.Generator().manual_seed(seed)
    draws = torch.cat([pm.mine(sim, g) for _ in range(4000)], dim=1)
    assert not (draws == torch.arange(3)[:, None]).any()
    p01 = math.exp(0.5 / 0.5) / (math.exp(0.5 / 0.5) + math.exp(0.1 / 0.5))
    assert (draws[0] == 1).float().mean().item() == pytest.approx(p01, abs=0.03)


def test_pair_matching_classifier_separates_a_synthetic_batch(seed):
    """Matching pairs are noisy copies, mismatches are random: the hyperplane learns to tell them apart."""
    v = F.normalize(torch.randn(64, 16), dim=-1)
    t = F.normalize(v + 0.15 * torch.randn(64, 16), dim=-1)
    pm = PairMatchingLoss(16, init_scale=1.0, init_bias=0.0, negatives=4)
    opt = torch.optim.Adam(pm.parameters(), lr=0.1)
    for _ in range(150):
        opt.zero_grad()
        pm(v, t).backward()
        opt.step()
    probs = pm.predict(v, t)
    assert (probs.diagonal() > 0.5).float().mean() > 0.95
    off = probs[~torch.eye(64, dtype=torch.bool)]
    assert (off < 0.5).float().mean() > 0.95


def test_feature_distillation(seed):
    v, t, tv, tt = unit(5, 6), unit(5, 6), unit(5, 6), unit(5, 6)
    fd = FeatureDistillation(6, 6)
    assert_same(fd, lambda v, t, tv, tt: ((v - tv) ** 2).mean() + ((t - tt) ** 2).mean(), v, t, tv, tt)
    assert fd(tv, tt, tv, tt).item() == 0.0
    mapped = FeatureDistillation(4, 6).double()
    sv, st = unit(5, 4), unit(5, 4)
    expected = ((F.normalize(mapped.image_proj(sv), dim=-1) - tv) ** 2).mean() + ((F.normalize(mapped.text_proj(st), dim=-1) - tt) ** 2).mean()
    torch.testing.assert_close(mapped(sv, st, tv, tt), expected)


def test_relation_distillation(seed):
    v, t, tv, tt = unit(6, 5), unit(6, 5), unit(6, 5), unit(6, 5)
    crd = ContrastiveRelationDistillation()

    def ref(v, t, tv, tt):
        s, ts = 12.0 * v @ t.T, 30.0 * tv @ tt.T
        return (ref_kl_rows(ts, s) + ref_kl_rows(ts.T, s.T)) / 2

    assert_same(lambda v, t, tv, tt: crd(v, t, 12.0, tv, tt, 30.0), ref, v, t, tv, tt)
    assert crd(tv, tt, 30.0, tv, tt, 30.0).abs().item() < 1e-12  # the similarity matrices agree


@pytest.mark.parametrize("mode", ["raw", "exp"])
def test_interactive_contrastive(seed, mode):
    v, t, tv, tt = unit(6, 5), unit(6, 5), unit(6, 5), unit(6, 5)
    icl = InteractiveContrastiveLoss(scale=mode).double()
    k = icl.cross_logit_scale.item() if mode == "raw" else math.exp(icl.cross_logit_scale.item())
    ref = lambda v, t, tv, tt: (ref_ce_rows(k * v @ tt.T) + ref_ce_rows(k * t @ tv.T)) / 2  # noqa: E731
    assert_same(icl, ref, v, t, tv, tt)


def test_objective_with_a_wider_teacher_matches_reference(seed):
    """A 768-wide teacher, a 512-wide student: FD and ICL both use FD's learned maps to 768 (CLIP-KD)."""
    n, student_dim, teacher_dim = 6, 512, 768
    objective = SiCLIPObjective(student_dim, teacher_dim).double()
    with torch.no_grad():
        for p in objective.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # maps, κ and PM away from their initial values
    sv, st = unit(n, student_dim), unit(n, student_dim)
    tv, tt = unit(n, teacher_dim, False), unit(n, teacher_dim, False)
    s_scale, t_scale = torch.tensor(14.0, dtype=D), torch.tensor(60.0, dtype=D)
    fd, icl, pm = objective.feature, objective.interactive, objective.pair_matching
    maps = [fd.image_proj.weight, fd.image_proj.bias, fd.text_proj.weight, fd.text_proj.bias]

    def reference(sv, st):
        pv = F.normalize(sv @ fd.image_proj.weight.T + fd.image_proj.bias, dim=-1)
        pt = F.normalize(st @ fd.text_proj.weight.T + fd.text_proj.bias, dim=-1)
        clip = ref_clip(sv, st, 14.0)
        feature = ((pv - tv) ** 2).mean() + ((pt - tt) ** 2).mean()
        s, ts = 14.0 * sv @ st.T, 60.0 * tv @ tt.T
        relation = (ref_kl_rows(ts, s) + ref_kl_rows(ts.T, s.T)) / 2
        kappa = icl.cross_logit_scale
        interactive = (ref_ce_rows(kappa * pv @ tt.T) + ref_ce_rows(kappa * pt @ tv.T)) / 2
        return clip + 4000 * feature + relation + interactive + 0.1 * pm(sv, st)

    impl = lambda sv, st: objective((sv, st, s_scale), (tv, tt, t_scale))["total"]  # noqa: E731
    loss, grads_in = grads(impl, sv, st)
    ref_loss, ref_grads = grads(reference, sv, st)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_in, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    map_grads = torch.autograd.grad(impl(sv, st), maps)
    ref_map_grads = torch.autograd.grad(reference(sv, st), maps)
    for a, b in zip(map_grads, ref_map_grads):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    # ICL alone still gets the maps (nothing else would bring the widths together); FD is then not returned.
    icl_only = SiCLIPObjective(student_dim, teacher_dim, ObjectiveConfig(feature=0, relation=0, pair_matching=0)).double()
    assert icl_only.feature is not None and set(icl_only((sv, st, s_scale), (tv, tt, t_scale))) == {"clip", "interactive", "total"}


def test_objective_weights_switches_and_parameters(seed):
    s = (unit(8, 6, False), unit(8, 6, False), torch.tensor(14.0, dtype=D))
    t = (unit(8, 6, False), unit(8, 6, False), torch.tensor(50.0, dtype=D))
    objective = SiCLIPObjective(6).double()
    terms = objective(s, t)
    assert set(terms) == {"clip", "feature", "relation", "interactive", "pair_matching", "total"}
    expected = terms["clip"] + 4000 * terms["feature"] + terms["relation"] + terms["interactive"] + 0.1 * terms["pair_matching"]
    torch.testing.assert_close(terms["total"], expected)
    names = {n for n, _ in objective.named_parameters()}
    assert {"interactive.cross_logit_scale", "pair_matching.weight", "pair_matching.bias"} <= names
    clip_only = SiCLIPObjective(6, config=ObjectiveConfig(feature=0, relation=0, interactive=0, pair_matching=0))
    assert set(clip_only(s)) == {"clip", "total"}
    with pytest.raises(ValueError, match="no teacher features"):
        objective(s)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (unit(4, 5), unit(5, 5)), "batch sizes differ"),
        (lambda: (unit(4, 5), unit(4, 6)), "widths differ"),
        (lambda: (unit(4, 5), torch.full((4, 5), float("nan"), dtype=D)), "NaN"),
        (lambda: (unit(4, 5)[0], unit(4, 5)), r"\(batch, dim\)"),
    ],
)
def test_bad_inputs_give_clear_errors(make, match):
    v, t = make()
    for loss in (lambda: ClipLoss()(v, t, 10.0), lambda: PairMatchingLoss(5)(v, t), lambda: SigLipLoss()(v, t)):
        with pytest.raises(ValueError, match=match):
            loss()
