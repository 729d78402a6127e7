import pytest
import torch
from torch.nn import functional as F

from siclip.data import EmbeddedConfig, create_tokenizer
from siclip.eval import evaluate_embedded, recall_at_k, topk_accuracy, zero_shot_weights
from siclip.models import create_model


def reference_recall(sim, owner, k):
    """Brute force: loops over images and texts."""
    n_img, n_txt = sim.shape
    i2t = sum(any(owner[j] == i for j in sorted(range(n_txt), key=lambda j: -sim[i, j])[:k]) for i in range(n_img)) / n_img
    t2i = sum(owner[j] in sorted(range(n_img), key=lambda i: -sim[i, j])[:k] for j in range(n_txt)) / n_txt
    return i2t, t2i


def test_recall_matches_brute_force(seed):
    images = F.normalize(torch.randn(12, 8, dtype=torch.float64), dim=-1)
    texts = F.normalize(torch.randn(36, 8, dtype=torch.float64), dim=-1)
    owner = torch.arange(12).repeat_interleave(3)
    got = recall_at_k(images, texts, owner, ks=(1, 5, 10))
    for k in (1, 5, 10):
        i2t, t2i = reference_recall(images @ texts.T, owner.tolist(), k)
        assert got[f"image_to_text_R@{k}"] == pytest.approx(i2t) and got[f"text_to_image_R@{k}"] == pytest.approx(t2i)
    perfect = recall_at_k(images, images.repeat_interleave(3, 0), owner)
    assert perfect["image_to_text_R@1"] == 1.0 and perfect["text_to_image_R@1"] == 1.0


def test_zero_shot_template_ensemble_and_accuracy(seed):
    table = {f"t{i} c{j}": F.normalize(torch.randn(6), dim=0) * (i + 1) for i in range(3) for j in range(4)}
    weights = zero_shot_weights(lambda texts: torch.stack([table[t] for t in texts]), [f"c{j}" for j in range(4)], ["t0 {}", "t1 {}", "t2 {}"])
    for j in range(4):
        expected = F.normalize(sum(F.normalize(table[f"t{i} c{j}"], dim=0) for i in range(3)) / 3, dim=0)
        torch.testing.assert_close(weights[j], expected)
    calls = []
    for per_call in (1, 7):  # one class a call (the floor), two classes a call: the same weights
        grouped = zero_shot_weights(lambda texts: calls.append(len(texts)) or torch.stack([table[t] for t in texts]),
                                    [f"c{j}" for j in range(4)], ["t0 {}", "t1 {}", "t2 {}"], prompts_per_call=per_call)  # fmt: skip
        torch.testing.assert_close(grouped, weights)
    assert calls == [3, 3, 3, 3, 6, 6]
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.4]])
    acc = topk_accuracy(logits, torch.tensor([1, 2, 0]), ks=(1, 2))
    assert acc["top1"] == pytest.approx(1 / 3) and acc["top2"] == pytest.approx(2 / 3)


def test_evaluate_embedded_runs_on_a_tiny_model():
    model = create_model("mobileclip_tiny")
    metrics = evaluate_embedded(model, create_tokenizer(), EmbeddedConfig(zero_shot_per_class=1, num_test=40))
    assert set(metrics) >= {"zeroshot_top1", "zeroshot_top5", "image_to_text_R@1", "text_to_image_R@10"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert model.training  # restored


def test_per_item_outcomes_average_to_the_metrics(seed):
    images = F.normalize(torch.randn(10, 8), dim=-1)
    texts = F.normalize(torch.randn(30, 8), dim=-1)
    owner = torch.arange(10).repeat_interleave(3)
    means, items = recall_at_k(images, texts, owner), recall_at_k(images, texts, owner, per_item=True)
    assert items["image_to_text_R@1"].shape == (10,) and items["text_to_image_R@5"].shape == (30,)
    for name, value in means.items():
        assert items[name].dtype == torch.bool and items[name].float().mean().item() == pytest.approx(value)
    logits, labels = torch.randn(20, 7), torch.randint(0, 7, (20,))
    hits = topk_accuracy(logits, labels, ks=(1, 3), per_item=True)
    for k in (1, 3):
        expected = [labels[i].item() in logits[i].topk(k).indices.tolist() for i in range(20)]
        assert hits[f"top{k}"].tolist() == expected
